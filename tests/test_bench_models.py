"""tools/bench_models.py --quick: every kind of row runs on the CPU and reports what it claims."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_models.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_models", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_models"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_run_measures_each_row_kind(bench, tmp_path):
    rows = ["full-eager", "lora-eager", "prefill-dense-eager", "prefill-window-compile",
            "prefill-topk", "sparsec-opbyop", "sparsec-bsa-compile"]
    named = rows[:5] + [f"{r}/{s}" for r in rows[5:] for s in ("op-classes", "min-cut")]
    out = tmp_path / "r.json"
    rc = bench.main(["--quick", "--layers", "1", "--steps", "1", "--warmup", "0",
                     "--compile-backend", "eager", "--rows", ",".join(rows), "--json", str(out),
                     "--reduce-saved-strategy", "op-classes,min-cut"])
    results = json.loads(out.read_text())
    got = results["lengths"]["128"]
    assert rc == 0, {n: r.get("error") for n, r in got.items()}
    assert sorted(got) == sorted(named)
    assert results["versions"]["transformers"] and results["date"]
    for name, r in got.items():
        assert r["tokens_per_s"] > 0 and r["setup_s"] >= 0, name
    lora_params = got["lora-eager"]["trainable"]
    for strategy in ("op-classes", "min-cut"):
        r = got[f"sparsec-opbyop/{strategy}"]
        assert 0 < r["trainable"] <= 1.05 * lora_params
        assert r["reduce_saved"]["strategy"] == strategy
        assert got[f"sparsec-bsa-compile/{strategy}"]["predicted_peak_bytes"] > 0
    for name in ("prefill-window-compile", "prefill-topk"):
        err = got[name]["error_vs_dense"]
        assert got[name]["density"] < 1 and err["finite"] and 0 < err["rel_l2_err"] < 1


def test_bad_rows_exit_2(bench, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--quick", "--rows", "nonsense"])
    assert e.value.code == 2
    assert "unknown nonsense" in capsys.readouterr().err


def test_profile_names_each_rows_attention_kernels(bench, tmp_path):
    out = tmp_path / "p.json"
    rc = bench.main(["--quick", "--layers", "1", "--steps", "1", "--warmup", "0", "--profile",
                     "--rows", "sparsec-opbyop,sparsec-bsa-opbyop", "--json", str(out)])
    got = json.loads(out.read_text())["lengths"]["128"]
    assert rc == 0, {n: r.get("error") for n, r in got.items()}
    dense = " ".join(k[0] for k in got["sparsec-opbyop"]["kernels"]["attention"])
    sparse = " ".join(k[0] for k in got["sparsec-bsa-opbyop"]["kernels"]["attention"])
    assert "scaled_dot_product" in dense and "block_sparse_attention" in sparse
    assert all(ms > 0 for _, ms, _ in got["sparsec-opbyop"]["kernels"]["top"])

"""HF checkpoint directories in (compile, train on JSONL), HF and PEFT directories out."""

import json

import pytest
import torch

import sparsec
from sparsec.sources import SourceOptions

from sparsec.testing.hf_dirs import SENTENCES, chat_rows, make_dir, write_jsonl

pytestmark = pytest.mark.slow
RECIPE = ('version = 1\n[[pass]]\nname = "sparse-finetune"\nmethod = "delta"\n'
          'density = 0.05\nselect = "magnitude"\n')


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_dir(tmp_path_factory.mktemp("hf") / "tiny-llama")


@pytest.fixture(scope="module")
def trained(llama_dir, tmp_path_factory):
    """Three steps of sparse fine-tuning on a JSONL file; the run's directory."""
    tmp = tmp_path_factory.mktemp("run")
    data = write_jsonl(tmp / "train.jsonl", chat_rows())
    recipe = tmp / "r.toml"
    recipe.write_text(RECIPE)
    out = tmp / "run"
    source = SourceOptions(data=data, eval_data=data, seq_len=8, batch_size=2)
    run = sparsec.train_model(llama_dir, steps=3, recipe=recipe, out_dir=out, lr=1e-2,
                              source=source, eval_every=2)
    return out, recipe, run


def test_train_on_jsonl_reports_eval_and_source(trained):
    out, _, run = trained
    report = json.loads((out / "report.json").read_text())
    assert report["source"]["task"] == "causal-lm" and report["source"]["seq_len"] == 8
    assert [s for s, _ in report["eval"]["losses"]] == [2, 3]
    assert all(torch.isfinite(torch.tensor(v)) for _, v in report["eval"]["losses"])
    assert report["train"]["steps"] == 3 and (out / "deltas.safetensors").exists()
    d = sparsec.load_deltas(out / "deltas.safetensors")
    assert any(bool(td.tensors["values"].abs().sum() > 0) for td in d.targets.values())


def _sparsec_logits(llama_dir, recipe, deltas, ids):
    compiled = sparsec.compile(llama_dir, recipe=recipe, deltas=deltas,
                               source=SourceOptions(seq_len=ids.shape[1],
                                                    batch_size=ids.shape[0]))
    out = compiled(ids)
    return out[0] if isinstance(out, (tuple, list)) else out


def test_export_hf_loads_with_transformers_and_matches(trained, llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from sparsec.export import export_model

    out, recipe, _ = trained
    record = export_model(llama_dir, out / "deltas.safetensors", tmp_path / "hf")
    assert record["parity"]["max_abs_err"] <= 1e-5
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    base = AutoModelForCausalLM.from_pretrained(llama_dir, local_files_only=True).eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, before = model(ids).logits, base(ids).logits
    want = _sparsec_logits(llama_dir, recipe, out / "deltas.safetensors", ids)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, want, atol=1e-5)  # the deltas changed the model


def test_export_peft_shira_loads_with_equal_outputs(trained, llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sparsec.export import export_model

    out, recipe, _ = trained
    record = export_model(llama_dir, out / "deltas.safetensors", tmp_path / "shira",
                          fmt="peft-shira")
    assert record["stored"] >= record["trained"] > 0
    base = AutoModelForCausalLM.from_pretrained(llama_dir, local_files_only=True)
    model = PeftModel.from_pretrained(base, tmp_path / "shira").eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = model(input_ids=ids).logits
    want = _sparsec_logits(llama_dir, recipe, out / "deltas.safetensors", ids)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_export_refuses_deltas_of_another_model(trained, tmp_path):
    from sparsec.errors import BadInputError
    from sparsec.export import export_model

    other = make_dir(tmp_path / "other", "bert")
    with pytest.raises(BadInputError, match="trained on base model"):
        export_model(other, trained[0] / "deltas.safetensors", tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kind,task,rows", [
    ("bert-mlm", "masked-lm", [{"text": s} for s in SENTENCES * 4]),
    ("bert-cls", "sequence-classification",
     [{"text": s, "label": i % 3} for i, s in enumerate(SENTENCES * 2)]),
    ("bert", "embedding", [{"anchor": s, "positive": s + " again"} for s in SENTENCES * 2]),
])
def test_each_task_trains_with_its_builtin_loss(tmp_path, kind, task, rows):
    path = make_dir(tmp_path / kind, kind)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    run = sparsec.train_model(path, steps=2, passes=["freeze:trainable=*.encoder.layer.1.*"],
                              source=SourceOptions(task=task, data=data, seq_len=8,
                                                   batch_size=4))
    losses = run.trainer.stats.losses
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert run.report["source"]["task"] == task


def test_compile_hf_dir_without_tokenizer_needs_seq_len(tmp_path):
    from sparsec.errors import BadInputError

    path = make_dir(tmp_path / "m")
    for f in path.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(BadInputError, match="--seq-len"):
        sparsec.compile(path)
    compiled = sparsec.compile(path, source=SourceOptions(seq_len=12, batch_size=1))
    assert compiled.program.example_inputs[0].shape == (1, 12)


def test_hf_dir_errors_are_one_line(tmp_path):
    from sparsec.errors import BadInputError

    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="is a directory without config.json"):
        sparsec.compile(tmp_path / "empty")
    (tmp_path / "nowts").mkdir()
    (tmp_path / "nowts" / "config.json").write_text("{}")
    with pytest.raises(BadInputError, match="safetensors"):
        sparsec.compile(tmp_path / "nowts")

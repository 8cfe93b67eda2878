"""Full and freeze fine-tuning from `sparsec train`: trainable tensors saved, refusals early."""

import json
import time

import pytest
import torch

import sparsec
from sparsec.errors import BadInputError
from sparsec.trainable import load_trainable

FREEZE = '[[pass]]\nname = "freeze"\ntrainable = ["layers.1.attn.q_proj.*"]\n'
JOINT = FREEZE + '[[pass]]\nname = "joint-graph"\nlr = 1e-2\n[[pass]]\nname = "prune-backward"\n'


@pytest.mark.parametrize("recipe,name", [(FREEZE, "freeze"), (JOINT, "freeze+joint")])
def test_freeze_recipe_trains_and_saves_trainable_tensors(tmp_path, tiny_llama_path, recipe,
                                                          name):
    r = tmp_path / "r.toml"
    r.write_text(recipe)
    base = sparsec.trace_file(tiny_llama_path)
    before = base.gm.get_parameter("layers.1.attn.q_proj.weight").detach().clone()
    lr = 1e-2 if name == "freeze" else None
    run = sparsec.train_model(tiny_llama_path, steps=2, recipe=r, out_dir=tmp_path / "o", lr=lr)
    header, tensors = load_trainable(tmp_path / "o" / "trainable.safetensors")
    assert sorted(tensors) == ["layers.1.attn.q_proj.weight"]
    assert header["base_fingerprint"] == base.fingerprint
    assert not torch.equal(tensors["layers.1.attn.q_proj.weight"], before)  # it trained
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert "trainable.safetensors" in report["artifacts"] and report["train"]["steps"] == 2
    assert run.trainer.stats.losses and not (tmp_path / "o" / "deltas.safetensors").exists()


def test_full_fine_tuning_saves_every_parameter(tmp_path, tiny_llama_path):
    run = sparsec.train_model(tiny_llama_path, steps=1, passes=["dead-code"],
                              out_dir=tmp_path / "o")
    _, tensors = load_trainable(tmp_path / "o" / "trainable.safetensors")
    assert set(tensors) == {n for n, _ in run.compiled.program.gm.named_parameters()}


def test_freeze_matching_nothing_is_refused_before_compiling(tmp_path, tiny_llama_path):
    r = tmp_path / "r.toml"
    r.write_text('[[pass]]\nname = "freeze"\ntrainable = ["*.nope.*"]\n'
                 '[[pass]]\nname = "joint-graph"\n')
    start = time.perf_counter()
    with pytest.raises(BadInputError, match=r"matches no parameter"):
        sparsec.train_model(tiny_llama_path, steps=1, recipe=r)
    assert time.perf_counter() - start < 5  # refused after the trace, before joint-graph


def test_cli_freeze_training(tmp_path, run_cli, tiny_llama_path):
    r = tmp_path / "r.toml"
    r.write_text(FREEZE)
    res = run_cli("train", tiny_llama_path, "--recipe", r, "--steps", "2", "-o", tmp_path / "o")
    assert res.returncode == 0, res.stderr
    assert "trainable.safetensors" in res.stdout
    assert "step 2/2" in res.stderr

"""Deltas as artifacts, and the issue's checks end to end through the CLI."""

import json
import sys

import pytest
import torch

import sparsec
from sparsec import BadInputError, run_passes
from sparsec.training.deltas import (
    apply_deltas,
    compose_deltas,
    extract_deltas,
    load_deltas,
    merge_deltas,
    save_deltas,
    unmerge_deltas,
)
from sparsec.passes.sparse_finetune import SparseFinetune
from sparsec.training import Trainer, train_model

RECIPE = """version = 1
[[pass]]
name = "sparse-finetune"
method = "{method}"
density = 0.01
"""


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_path):
    sys.path.insert(0, str(tiny_llama_path.parent))
    import tiny_llama

    yield tiny_llama
    sys.path.remove(str(tiny_llama_path.parent))


def _trained(tiny_llama_program, tiny_llama, steps=5, **opts):
    p = run_passes(tiny_llama_program, [SparseFinetune(**opts)], verify=False)
    Trainer(p, lr=1e-2).fit(lambda: tiny_llama.batches(steps), steps)
    return p


def _bits(t):
    if not t.is_floating_point():
        return t
    return t.view(torch.int64 if t.element_size() == 8 else torch.int32)


def test_save_load_is_bit_exact_and_apply_reproduces_the_program(tiny_llama_program, tiny_llama,
                                                                 tmp_path):
    regrown = {"select": "principal", "regrow_every": 1, "regrow_fraction": 0.5}
    for opts in (regrown, {"method": "structured"}, {"method": "nm"}):
        p = _trained(tiny_llama_program, tiny_llama, steps=2, **opts)
        d = extract_deltas(p, info={"step": 2})
        path = save_deltas(d, tmp_path / "d.safetensors")
        back = load_deltas(path, base=tiny_llama_program)
        assert back.header() == d.header()
        for w, td in d.targets.items():
            for k, t in td.tensors.items():
                assert torch.equal(_bits(back.targets[w].tensors[k]), _bits(t)), (w, k)
        fresh = run_passes(tiny_llama_program, [SparseFinetune(**opts)], verify=False)
        if opts is regrown:  # prune–regrow moved the entries away from a fresh selection
            w = "layers.0.attn.q_proj.weight"
            assert not torch.equal(fresh.gm.get_buffer("layers.0.attn.q_proj.delta_indices"),
                                   d.targets[w].tensors["indices"])
        apply_deltas(fresh, back)
        x = tiny_llama_program.example_inputs
        assert torch.equal(fresh.gm(*x), p.gm(*x))


def test_merge_then_unmerge_restores_the_base_bit_for_bit(tiny_llama_program, tiny_llama):
    p = _trained(tiny_llama_program, tiny_llama, select="random")
    d = extract_deltas(p)
    model = tiny_llama.model()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    undo = merge_deltas(model, d)
    x = tiny_llama_program.example_inputs
    with torch.no_grad():
        assert torch.equal(model(*x), p.gm(*x))  # merged eager model == fine-tuned program
    assert any(not torch.equal(before[n], t) for n, t in model.state_dict().items())
    unmerge_deltas(model, undo)
    for n, t in model.state_dict().items():
        assert torch.equal(_bits(t), _bits(before[n])), n


def test_nm_merged_weights_are_exactly_n_of_m(tiny_llama_program, tiny_llama):
    p = _trained(tiny_llama_program, tiny_llama, method="nm", n=2, m=4)
    d = extract_deltas(p)
    model = tiny_llama.model()
    merge_deltas(model, d)
    for w in d.targets:
        nz = (model.get_parameter(w) != 0).reshape(-1, 4).sum(-1)
        assert (nz == 2).all(), w


def test_compose_disjoint_overlapping_and_sum(tiny_llama_program, tiny_llama):
    a = extract_deltas(_trained(tiny_llama_program, tiny_llama, steps=2, select="magnitude"))
    b = extract_deltas(_trained(tiny_llama_program, tiny_llama, steps=2, select="random", seed=5))
    with pytest.raises(BadInputError, match="overlap at .* entries of .*overlap='sum'"):
        compose_deltas(a, a)
    c = compose_deltas(a, b, overlap="sum")
    w = "layers.0.mlp.up_proj.weight"
    base = tiny_llama_program.gm.get_parameter(w).detach()
    dense = torch.zeros_like(base).reshape(-1)
    for d in (a, b):
        dense.index_add_(0, d.targets[w].tensors["indices"], d.targets[w].tensors["values"])
    got = c.targets[w].merged(base) - base
    torch.testing.assert_close(got.reshape(-1), dense)
    half = {k: v for k, v in list(b.targets.items())[:3]}
    disjoint = compose_deltas(a.__class__(a.base_fingerprint, dict(list(a.targets.items())[3:])),
                              a.__class__(b.base_fingerprint, half))
    assert set(disjoint.targets) == set(a.targets)
    nm = extract_deltas(_trained(tiny_llama_program, tiny_llama, steps=1, method="nm"))
    with pytest.raises(BadInputError, match="nm deltas replace the whole weight"):
        compose_deltas(a, nm)


def test_damaged_or_foreign_files_are_refused(tmp_path, tiny_llama_program):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(BadInputError, match="not a readable safetensors"):
        load_deltas(bad)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(BadInputError, match="no sparsec deltas header"):
        load_deltas(tmp_path / "plain.safetensors")


# the checks, as a new user runs them ------------------------------------------------------
OTHER_BASE = """
import sys
sys.path.insert(0, {examples!r})
from tiny_llama import *  # noqa
from tiny_llama import Llama, Config, init_weights


def model():
    return init_weights(Llama(Config()), seed=1)  # same architecture, other weights
"""


def test_cli_end_to_end(run_cli, tiny_llama_path, tmp_path):
    recipe = tmp_path / "delta.toml"
    recipe.write_text(RECIPE.format(method="delta"))
    r = run_cli("train", tiny_llama_path, "--recipe", recipe, "--steps", "30", "--lr", "1e-2",
                "--save-every", "10", "-o", tmp_path / "t")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "t" / "report.json").read_text())
    t = report["train"]
    assert t["steps"] == 30 and t["completed"] and t["deltas_step"] == 30
    assert t["loss_last"] < t["loss_first"] - 0.05
    assert t["tokens_per_s"] > 0 and t["peak_memory_bytes"] > 0
    deltas = tmp_path / "t" / "deltas.safetensors"
    assert load_deltas(deltas).info == {"step": 30}

    r = run_cli("compile", tiny_llama_path, "--recipe", recipe, "--deltas", deltas,
                "--backend", "onnx", "-o", tmp_path / "onnx")
    assert r.returncode == 0, r.stderr
    onnx_report = json.loads((tmp_path / "onnx" / "report.json").read_text())
    assert onnx_report["onnx"]["merged_sparse_ops"] == 14
    for rep in (report, onnx_report):  # the compile and the train report the same selection
        sf = rep["sparse_finetune"]
        assert 0.0095 <= sf["trainable_in_targets"] / sf["targeted_weights"] <= 0.0105
    _check_deployed(tmp_path / "onnx" / "model.onnx", tiny_llama_path, deltas, tmp_path / "base")

    other = tmp_path / "other.py"
    other.write_text(OTHER_BASE.format(examples=str(tiny_llama_path.parent)))
    r = run_cli("compile", other, "--recipe", recipe, "--deltas", deltas)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "trained on base model" in r.stderr


def _initializers(path):
    import onnx

    m = onnx.load(str(path))
    return sorted(tuple(i.dims) for i in m.graph.initializer), len(m.graph.node)


def _check_deployed(onnx_path, tiny_llama_path, deltas_path, base_dir):
    """The ONNX model is the base architecture (same initializers and node count as the
    base's own export) and computes base + merged deltas."""
    from sparsec.backends.onnx import OnnxRunner

    sparsec.compile(tiny_llama_path, backend="onnx", out_dir=base_dir, verify=False)
    assert _initializers(onnx_path) == _initializers(base_dir / "model.onnx")
    base = sparsec.trace_file(tiny_llama_path)
    merge_deltas(base, load_deltas(deltas_path))
    x = base.example_inputs
    with torch.no_grad():
        want = base.gm(*x)
    (got,) = OnnxRunner(onnx_path)(*x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


FAILING = """
import sys
sys.path.insert(0, {examples!r})
from tiny_llama import *  # noqa
import tiny_llama


def batches():
    for i, b in enumerate(tiny_llama.batches(100)):
        if i == 5:
            raise RuntimeError("the data loader broke")
        yield b
"""


def test_failed_run_keeps_its_last_checkpoint_and_says_so(tmp_path, tiny_llama_path):
    model = tmp_path / "failing.py"
    model.write_text(FAILING.format(examples=str(tiny_llama_path.parent)))
    # batches() raising is the user's error (exit 2), naming the checkpoint it kept
    # ... and the line of failing.py that raised (batches() reaches the trainer wrapped)
    with pytest.raises(BadInputError,
                       match=r"^failing\.py:11: .*data loader.*checkpoint of step 4"):
        train_model(model, steps=10, passes=("sparse-finetune",), out_dir=tmp_path / "run",
                    save_every=2, verify=False)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["train"]["completed"] is False and report["train"]["deltas_step"] == 4
    assert load_deltas(tmp_path / "run" / "deltas.safetensors").info == {"step": 4}
    with pytest.raises(BadInputError):  # no checkpoint yet: nothing is written at all
        train_model(model, steps=10, passes=("sparse-finetune",), out_dir=tmp_path / "run2",
                    verify=False)
    assert not (tmp_path / "run2").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_onnx_export_merges_structured_and_nm(tiny_llama_path, tmp_path):
    passes = ["sparse-finetune:method=structured,targets=['*.attn.*']",
              "sparse-finetune:method=nm,targets=['*.mlp.*']"]
    compiled = sparsec.compile(tiny_llama_path, passes=passes, verify=False)
    with torch.no_grad():  # make the deltas nonzero so the merge has something to do
        for name, t in compiled.program.gm.named_parameters():
            if name.endswith("struct_delta"):
                t.normal_(std=0.1)
    onnx = sparsec.lower(compiled.program, "onnx",
                         sparsec.LowerOptions(out_dir=tmp_path))  # parity is checked inside
    assert onnx.report["onnx"]["merged_sparse_ops"] == 14
    assert onnx.report["onnx"]["max_rel_err"] <= 1e-4

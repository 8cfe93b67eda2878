"""`reduce-saved:strategy=min-cut`: exact, saves less than the op-class walk, meets budgets."""

import copy

import pytest
import torch
from hypothesis import assume, given

from sparsec import ModelSource, parse_pass_arg, run_passes, trace
from sparsec.memory import predict_peak
from sparsec.passes.min_cut import min_cut_saved
from sparsec.testing import check_pass
from sparsec.testing import strategies as sst
from sparsec.testing.pytest_plugin import examples

from .test_joint_graph import _compiled_updates, _eager_updates, _mse, _rel


@pytest.fixture(scope="module")
def pruned(tiny_llama_program):
    return run_passes(tiny_llama_program, [
        parse_pass_arg("sparse-finetune:method=structured,select=norm,density=0.1"),
        parse_pass_arg("joint-graph"), parse_pass_arg("prune-backward")])


def _after(stats, key):
    return int(stats[key].split(" -> ")[1])


@pytest.mark.parametrize("recompute", ["pointwise", "matmul"])
def test_min_cut_is_exact_and_beats_op_classes(pruned, recompute):
    cut = check_pass(parse_pass_arg(f"reduce-saved:recompute={recompute},strategy=min-cut"),
                     pruned)
    assert cut.max_rel_err == 0.0  # the same ops on the same values
    classes = run_passes(pruned, [parse_pass_arg(f"reduce-saved:recompute={recompute}")])
    walk = classes.history[-1].stats
    assert cut.stats["strategy"] == "min-cut" and walk["strategy"] == "op-classes"
    assert _after(cut.stats, "saved_bytes") < _after(walk, "saved_bytes")
    peak = _after(cut.stats, "predicted_peak_bytes")
    assert peak == predict_peak(cut.program.gm).peak_bytes
    assert peak < int(cut.stats["predicted_peak_bytes"].split(" -> ")[0])
    assert peak <= _after(walk, "predicted_peak_bytes")
    assert (cut.stats["recompute_matmul_flops"] > 0) == (recompute == "matmul")


def test_min_cut_budget_prices_products_until_the_peak_fits(pruned):
    every = run_passes(pruned, [parse_pass_arg("reduce-saved:recompute=matmul,strategy=min-cut")])
    least = run_passes(pruned, [parse_pass_arg("reduce-saved:strategy=min-cut")])
    low, high = (_after(p.history[-1].stats, "predicted_peak_bytes") for p in (every, least))
    assert low < high
    budget = (low + high) / 2
    some = check_pass(parse_pass_arg(
        f"reduce-saved:recompute=matmul,strategy=min-cut,budget_gib={budget / 2**30}"), pruned)
    assert some.max_rel_err == 0.0
    assert _after(some.stats, "predicted_peak_bytes") <= budget
    assert some.stats["flop_price_bytes"] > 1e-6
    assert 0 < some.stats["recompute_matmul_flops"] < every.history[-1].stats[
        "recompute_matmul_flops"]


def test_min_cut_saves_one_value_to_rebuild_two():
    """The backward reads sin(x·w) and cos(x·w): saving x·w alone is the cheaper cut."""
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            a = x @ self.w
            return a.sin() * a.cos()

    program = trace(M(), (torch.randn(4, 8),))
    program.source = ModelSource(name="m", loss=_mse)
    joint = run_passes(program, [parse_pass_arg("joint-graph")])
    graph = joint.gm.graph
    trig = (torch.ops.aten.sin.default, torch.ops.aten.cos.default)
    saved = {n.target for n in min_cut_saved(graph, lambda n: n.target in trig, lambda n: 1)}
    assert torch.ops.aten.mm.default in saved and not saved & set(trig)
    everything = {n.target for n in min_cut_saved(graph, lambda n: False, lambda n: 1)}
    assert set(trig) <= everything  # nothing recomputable: save what the backward reads
    cut = check_pass(parse_pass_arg("reduce-saved:strategy=min-cut"), joint)
    assert cut.max_rel_err == 0.0 and cut.stats["recomputed"] >= 2


@examples(4)
@given(model=sst.models(max_layers=2))
def test_min_cut_random_models_step_equals_eager(model):
    program = trace(model, sst.inputs_for(model))
    program.source = ModelSource(name="random", loss=_mse)
    assume(list(program.gm.parameters()))
    forward = copy.deepcopy(program.gm)
    trainable = [n for n, p in forward.named_parameters() if p.requires_grad]
    joint = parse_pass_arg("joint-graph:lr=0.001")
    out = run_passes(program, [joint, parse_pass_arg("prune-backward"),
                               parse_pass_arg("reduce-saved:recompute=matmul,strategy=min-cut"),
                               parse_pass_arg("optimizer-in-backward")])
    _, want = _eager_updates(forward, trainable, out.example_inputs, 1, _mse, 2, joint.config())
    _, got = _compiled_updates(out, 2)
    for n in trainable:
        assert _rel(got[n], want[n]) < 1e-5, n

"""Stage 2: the traced training step equals eager training, and the joint passes keep it so."""

import copy
import json

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import sparsec
from sparsec import ModelSource, PreconditionError, parse_pass_arg, run_passes, trace
from sparsec.optim import OptimizerConfig, torch_optimizer
from sparsec.testing import check_pass
from sparsec.testing import strategies as sst
from sparsec.testing.pytest_plugin import examples

JOINT_PASSES = ["prune-backward", "reduce-saved", "optimizer-in-backward"]


def _mse(out, batch):
    return (out.float() ** 2).mean()


def _eager_updates(forward, trainable, batch, n_inputs, loss, steps, config):
    gm = copy.deepcopy(forward)
    params = dict(gm.named_parameters())
    for n, p in params.items():
        p.requires_grad_(n in trainable)
    opt = torch_optimizer([params[n] for n in trainable], config)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        value = loss(gm(*batch[:n_inputs]), batch)
        value.backward()
        opt.step()
        losses.append(float(value.detach()))
    return losses, {n: params[n].detach() for n in trainable}


def _compiled_updates(program, steps):
    losses = [float(program.gm(*program.example_inputs)[0]) for _ in range(steps)]
    info = program.joint
    return losses, {n: program.get_tensor(n).detach() for n in info.trainable}


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("passes", [[], JOINT_PASSES])
def test_tiny_llama_steps_match_eager_adamw(tiny_llama_program, passes):
    base = run_passes(tiny_llama_program, [parse_pass_arg("freeze:trainable=[*.q_proj.*,*.mlp.*]")])
    forward = copy.deepcopy(base.gm)
    trainable = [n for n, p in forward.named_parameters() if p.requires_grad]
    program = run_passes(base, [parse_pass_arg("joint-graph:lr=0.001")] +
                         [parse_pass_arg(p) for p in passes])
    assert program.history[1].verify["rel_l2_err"] < 1e-5
    config = OptimizerConfig(lr=0.001)
    want_l, want = _eager_updates(forward, trainable, program.example_inputs, 1,
                                  base.source.loss, 3, config)
    got_l, got = _compiled_updates(program, 3)
    assert got_l == pytest.approx(want_l, rel=1e-5)
    assert got_l[2] < got_l[0]
    for n in trainable:  # parameters after 3 steps, relative to their size
        assert _rel(got[n], want[n]) < 1e-5, n


def test_float64_step_equals_eager_exactly(tiny_llama_path):
    mf = sparsec.load_model_file(tiny_llama_path)
    model, inputs = mf.build()
    program = trace(model.double(), inputs, source=ModelSource("t", loss=mf.loss,
                                                                batches=mf.batches))
    out = run_passes(program, [parse_pass_arg("sparse-finetune:method=structured,select=norm"),
                               parse_pass_arg("joint-graph")])
    from sparsec.joint import step_report
    check = step_report(out)["grad_check"]
    assert check["max_rel_err"] < 1e-12 and check["rel_l2_err"] < 1e-13


@examples(6)
@given(model=sst.models(max_layers=3), frozen=st.lists(st.booleans(), min_size=40, max_size=40),
       optimizer=st.sampled_from(["adamw", "sgd"]))
def test_random_models_step_equals_eager(model, frozen, optimizer):
    program = trace(model, sst.inputs_for(model))
    program.source = ModelSource(name="random", loss=_mse)
    params = list(program.gm.named_parameters())
    assume(params)
    for (_, p), f in zip(params, frozen):
        p.requires_grad_(not f)
    if not any(p.requires_grad for _, p in params):
        params[0][1].requires_grad_(True)
    forward = copy.deepcopy(program.gm)
    trainable = [n for n, p in forward.named_parameters() if p.requires_grad]
    joint = parse_pass_arg(f"joint-graph:optimizer={optimizer},lr=0.001,momentum=0.5")
    out = run_passes(program, [joint] + [parse_pass_arg(p) for p in JOINT_PASSES])
    config = joint.config()
    _, want = _eager_updates(forward, trainable, out.example_inputs, 1, _mse, 2, config)
    _, got = _compiled_updates(out, 2)
    for n in trainable:
        assert _rel(got[n], want[n]) < 1e-5, n


def test_joint_passes_are_checked_and_idempotent(tiny_llama_program):
    base = run_passes(tiny_llama_program, [parse_pass_arg("freeze:trainable=[*.q_proj.*]"),
                                           parse_pass_arg("joint-graph")])
    for name in JOINT_PASSES:
        result = check_pass(parse_pass_arg(name), base)
        base = result.program
    stats = base.history[-3].stats
    assert stats["frozen_grads_removed"] == 18  # 20 parameters, 2 trainable
    assert stats["matmul_flops_removed"] > 0


@pytest.mark.parametrize("recompute", ["pointwise", "matmul"])
def test_reduce_saved_recomputes_exactly_and_saves_less(tiny_llama_program, recompute):
    base = run_passes(tiny_llama_program, [
        parse_pass_arg("sparse-finetune:method=structured,select=norm,density=0.1"),
        parse_pass_arg("joint-graph"), parse_pass_arg("prune-backward")])
    result = check_pass(parse_pass_arg(f"reduce-saved:recompute={recompute}"), base)
    assert result.max_rel_err == 0.0  # recomputation repeats the same ops on the same values
    before, after = (int(x) for x in result.stats["saved_bytes"].split(" -> "))
    assert after < 0.6 * before
    assert (result.stats["recompute_matmul_flops"] > 0) == (recompute == "matmul")


def test_reduce_saved_budget_recomputes_only_what_it_needs(tiny_llama_program):
    base = run_passes(tiny_llama_program, [
        parse_pass_arg("sparse-finetune:method=structured,select=norm,density=0.1"),
        parse_pass_arg("joint-graph"), parse_pass_arg("prune-backward")])
    every = run_passes(base, [parse_pass_arg("reduce-saved:recompute=matmul")])
    peak = int(every.history[-1].stats["predicted_peak_bytes"].split(" -> ")[1])
    budget = (peak * 1.04) / 2**30
    some = check_pass(parse_pass_arg(f"reduce-saved:recompute=matmul,budget_gib={budget}"), base)
    assert int(some.stats["predicted_peak_bytes"].split(" -> ")[1]) <= budget * 2**30
    assert 0 < some.stats["recompute_matmul_flops"] < every.history[-1].stats[
        "recompute_matmul_flops"]


def test_prune_backward_needs_the_joint_graph(tiny_llama_program):
    with pytest.raises(PreconditionError, match="run 'joint-graph' before it"):
        run_passes(tiny_llama_program, [parse_pass_arg("prune-backward")])


def test_joint_graph_needs_a_loss_and_something_trainable():
    model = torch.nn.Linear(4, 4)
    program = trace(model, (torch.randn(2, 4),))
    with pytest.raises(sparsec.BadInputError, match="needs a loss"):
        run_passes(program, [parse_pass_arg("joint-graph")])
    program.source = ModelSource(name="m", loss=_mse)
    with pytest.raises(sparsec.BadInputError, match="nothing is trainable"):
        run_passes(program, [parse_pass_arg("freeze"), parse_pass_arg("joint-graph")])


def test_cli_reports_memory_plan_and_grad_check(run_cli, tiny_llama_path, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("\n".join(
        ['[[pass]]\nname = "freeze"\ntrainable = ["*.q_proj.*"]', '[[pass]]\nname = "joint-graph"']
        + [f'[[pass]]\nname = "{p}"' for p in JOINT_PASSES]))
    r = run_cli("compile", tiny_llama_path, "--recipe", recipe, "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    mem = report["memory"]
    assert report["grad_check"]["rel_l2_err"] < 1e-5 and report["grad_check"]["max_rel_err"] < 1e-3
    assert abs(mem["measured_peak_bytes"] - mem["predicted_peak_bytes"]) <= \
        0.05 * mem["measured_peak_bytes"]
    assert mem["measured_peak_bytes"] < mem["eager_full_ft_peak_bytes"]
    pruned = next(p for p in report["passes"] if p["name"] == "prune-backward")
    assert pruned["stats"]["nodes_removed"] > 0


def test_compiled_train_step_runs_the_traced_step(tiny_llama_program):
    program = run_passes(tiny_llama_program, [
        parse_pass_arg("sparse-finetune:method=delta,density=0.05"),
        parse_pass_arg("joint-graph:lr=0.01"), parse_pass_arg("prune-backward")])
    compiled = sparsec.lower(program, "eager", sparsec.LowerOptions(verify=False))
    batches = iter(program.source.batches())
    losses = [compiled.train_step(next(batches)) for _ in range(30)]
    assert compiled.trainer is None  # the traced step, not an eager Trainer
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5

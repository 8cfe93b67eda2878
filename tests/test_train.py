import sys

import pytest
import torch

import sparsec
from sparsec import BadInputError, run_passes
from sparsec.passes.sparse_finetune import SparseFinetune
from sparsec.training import Trainer
from sparsec.training.data import batch_tokens


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_path):
    sys.path.insert(0, str(tiny_llama_path.parent))
    import tiny_llama

    yield tiny_llama
    sys.path.remove(str(tiny_llama_path.parent))


def _program(tiny_llama_program, **opts):
    return run_passes(tiny_llama_program, [SparseFinetune(**opts)], verify=False)


def test_optimizer_state_exists_only_for_trainable_values(tiny_llama_program, tiny_llama):
    p = _program(tiny_llama_program)
    trainer = Trainer(p, lr=1e-2)
    trainer.step(next(tiny_llama.batches(1)))
    trainable = {id(t) for _, t in p.trainable_parameters()}
    assert {id(t) for t in trainer.optimizer.state} == trainable
    for t, s in trainer.optimizer.state.items():
        assert s["exp_avg"].shape == t.shape and t.dim() == 1  # k values, never m × n
    assert all(p.grad is None for n, p in p.gm.named_parameters() if n.endswith(".weight"))


def test_training_lowers_the_loss_and_leaves_the_base_untouched(tiny_llama_program, tiny_llama):
    p = _program(tiny_llama_program, select="principal")
    base = {n: t.clone() for n, t in p.gm.named_parameters() if n.endswith("weight")}
    trainer = Trainer(p, lr=1e-2)
    stats = trainer.fit(lambda: tiny_llama.batches(25), 25)
    first, last = stats.losses[0], sum(stats.losses[-5:]) / 5
    assert last < first - 0.05, (first, last)
    for n, t in p.gm.named_parameters():
        if n in base:
            assert torch.equal(t, base[n]), n
    section = stats.to_json()
    assert section["steps"] == 25 and section["tokens"] == 25 * 2 * 32
    assert section["tokens_per_s"] > 0 and section["peak_memory_bytes"] > 0


def test_compiled_train_step_and_inference_backends(tiny_llama_path, tiny_llama):
    compiled = sparsec.compile(tiny_llama_path, passes=["sparse-finetune:method=structured"],
                               verify=False)
    batch = next(tiny_llama.batches(1))
    l1 = compiled.train_step(batch)
    assert isinstance(compiled.trainer, Trainer) and l1 > 0
    assert compiled.train_step(batch) < l1  # same batch, one AdamW step later
    compiled.backend = "onnx"
    compiled.trainer = None
    with pytest.raises(BadInputError, match="eager backend"):
        compiled.train_step(batch)


def test_nothing_to_train_is_a_clear_error(tiny_llama_program):
    p = run_passes(tiny_llama_program, [sparsec.get_pass("freeze")()], verify=False)
    with pytest.raises(BadInputError, match="nothing to train"):
        Trainer(p)


def test_batch_tokens():
    assert batch_tokens((torch.zeros(2, 7, dtype=torch.long),)) == 14
    assert batch_tokens((torch.zeros(2, 7, 5),)) == 14
    assert batch_tokens((torch.zeros(3),)) == 3


# prune–regrow ---------------------------------------------------------------------------------
class _One(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(6, 4, bias=False)])

    def forward(self, x):
        return self.blocks[0](x)


def _regrow_program(every=1, fraction=0.5, density=0.25, warmup=0):
    torch.manual_seed(0)
    program = sparsec.trace(_One(), (torch.randn(3, 6),))
    program.source.loss = lambda out, batch: (out - batch[1]).square().mean()
    return run_passes(program, [SparseFinetune(density=density, regrow_every=every,
                                               regrow_fraction=fraction,
                                               regrow_warmup=warmup)], verify=False)


def test_regrow_moves_optimizer_state_with_the_entries():
    p = _regrow_program()
    trainer = Trainer(p, lr=1e-2)
    (t,) = trainer.regrow_targets
    k = t.values.numel()  # 6 of 24
    with torch.no_grad():
        t.indices.copy_(torch.tensor([0, 3, 5, 8, 13, 20]))
        t.values.copy_(torch.tensor([0.5, -0.01, 0.3, 0.02, -0.4, 0.001]))
    state = trainer.optimizer.state[t.values]
    state["exp_avg"] = torch.arange(1.0, k + 1)
    state["exp_avg_sq"] = torch.arange(1.0, k + 1) * 10
    state["step"] = torch.tensor(7.0)
    grad = torch.zeros(4, 6)
    grad.view(-1)[[1, 3, 22, 9, 4]] = torch.tensor([9.0, 100.0, -8.0, 7.0, 0.5])  # 3 is active
    t.grad_sum = grad
    assert trainer._regrow(t) == 3
    # kept: the 3 largest |Δ| (indices 0, 5, 13); grown: largest |grad| off the active set: 1, 22, 9
    assert t.indices.tolist() == [0, 1, 5, 9, 13, 22]
    assert t.values.tolist() == pytest.approx([0.5, 0.0, 0.3, 0.0, -0.4, 0.0])
    assert state["exp_avg"].tolist() == [1.0, 0.0, 3.0, 0.0, 5.0, 0.0]
    assert state["exp_avg_sq"].tolist() == [10.0, 0.0, 30.0, 0.0, 50.0, 0.0]
    assert float(state["step"]) == 7.0 and t.grad_sum is None


def test_regrow_during_training_keeps_the_invariants():
    p = _regrow_program(every=3, fraction=0.5)
    trainer = Trainer(p, lr=5e-2, regrow_window=2)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(3, 6, generator=g), torch.randn(3, 4, generator=g)) for _ in range(9)]
    trainer.fit(batches, 9)
    (t,) = trainer.regrow_targets
    assert trainer.stats.regrows == 3 and trainer.stats.regrown_entries == 9
    idx = t.indices
    assert idx.numel() == 6 and bool((idx[1:] > idx[:-1]).all())
    assert not p.gm.get_parameter("blocks.0.weight").requires_grad
    assert p.gm.get_parameter("blocks.0.weight").grad is None


def test_regrow_warmup_scales_a_grown_entrys_first_updates():
    """Two runs alike up to the regrowth at step 2; then a grown entry's update is 1/4 of the
    unwarmed one's, 2/4 of a full step the next time, while kept entries move identically."""
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(3, 6, generator=g), torch.randn(3, 4, generator=g)) for _ in range(4)]
    runs = {}
    for warmup in (0, 4):
        p = _regrow_program(every=2, fraction=0.5, warmup=warmup)
        trainer = Trainer(p, lr=5e-2, weight_decay=0.1)
        (t,) = trainer.regrow_targets
        assert p.state["sparse_finetune"]["targets"]["blocks.0.weight"]["regrow_warmup"] == warmup
        trainer.fit(batches[:2], 2)  # the regrowth after step 2
        grown = t.values == 0
        assert int(grown.sum()) == 3
        before = t.values.detach().clone()
        trainer.step(batches[2])
        runs[warmup] = (t, grown, before, t.values.detach().clone(), trainer)
    (t0, grown, before0, after0, _), (t4, grown4, before4, after4, tr4) = runs[0], runs[4]
    assert torch.equal(t0.indices, t4.indices) and torch.equal(grown, grown4)
    assert torch.equal(before0, before4)
    assert torch.equal(after0[~grown], after4[~grown])  # kept entries: unaffected, bit for bit
    full = after0[grown] - before0[grown]
    assert bool((full.abs() > 1e-3).all())
    assert torch.allclose(after4[grown] - before4[grown], full / 4, rtol=1e-5, atol=1e-9)
    assert t0.age is None and t4.age[grown].tolist() == [1, 1, 1]
    assert set(t4.age[~grown].tolist()) == {4}
    # the second update after growth: 2/4 of what AdamW's step would have been
    opt, t4.every = tr4.optimizer, 10**6  # no more regrowths
    snapshot = {k: v.clone() for k, v in opt.state[t4.values].items()}
    values = t4.values.detach().clone()
    tr4.step(batches[3])
    warmed = t4.values.detach().clone()
    with torch.no_grad():  # redo the step unscaled from the same state
        t4.values.copy_(values)
        opt.state[t4.values].update({k: v.clone() for k, v in snapshot.items()})
        t4.age.fill_(4)
    tr4.step(batches[3])
    unscaled = t4.values.detach()
    assert torch.allclose(warmed[grown] - values[grown], (unscaled[grown] - values[grown]) / 2,
                          rtol=1e-5, atol=1e-9)
    assert torch.equal(warmed[~grown], unscaled[~grown])


JOINT = ["joint-graph:lr=0.01", "prune-backward", "reduce-saved", "optimizer-in-backward"]


def test_traced_step_trains_like_the_eager_trainer(tiny_llama_program, tiny_llama):
    """A recipe with joint-graph trains through its traced step (loss, backward and AdamW in
    the graph); the deltas after three steps equal the eager Trainer's (same lr, AdamW)."""
    sparse = "sparse-finetune:method=delta,density=0.05,select=magnitude"
    eager = run_passes(tiny_llama_program, [sparsec.parse_pass_arg(sparse)], verify=False)
    traced = run_passes(tiny_llama_program,
                        [sparsec.parse_pass_arg(p) for p in [sparse, *JOINT]], verify=False)
    batches = list(tiny_llama.batches(3))
    t_eager, t_traced = Trainer(eager, lr=0.01), Trainer(traced, lr=123.0)  # lr: the recipe's
    losses = [(t_eager.step(b), t_traced.step(b)) for b in batches]
    assert t_traced.optimizer is None and t_traced.learning_rate() == 0.01
    assert t_traced.stats.steps == 3 and t_traced.stats.tokens == t_eager.stats.tokens
    for le, lt in losses:
        assert abs(le - lt) <= 1e-5 * abs(le)
    assert losses[-1][1] < losses[0][1]
    want = dict(eager.trainable_parameters())
    got = dict(traced.forward_module().named_parameters())
    for name, value in want.items():
        err = float((got[name] - value).detach().norm() / value.detach().norm())
        assert err <= 1e-5, (name, err)


@pytest.mark.parametrize("sparse,kwargs,match", [
    ("sparse-finetune:method=delta,density=0.05,regrow_every=2", {}, "regrow_every = 0"),
    ("sparse-finetune:method=delta,density=0.05", {"lr_overrides": {"*": 1.0}},
     "set lr in the joint-graph pass"),
])
def test_traced_step_refuses_what_it_cannot_do(tiny_llama_program, sparse, kwargs, match):
    program = run_passes(tiny_llama_program,
                         [sparsec.parse_pass_arg(p) for p in [sparse, *JOINT]], verify=False)
    with pytest.raises(BadInputError, match=match):
        Trainer(program, **kwargs)


def test_cli_trains_a_joint_recipe(run_cli, tiny_llama_path, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('version = 1\n[[pass]]\nname = "sparse-finetune"\nmethod = "structured"\n'
                      + "".join(f'[[pass]]\nname = "{p.split(":")[0]}"\n' for p in JOINT))
    r = run_cli("train", tiny_llama_path, "--recipe", recipe, "--steps", "2", "-o",
                tmp_path / "out")
    assert r.returncode == 0, r.stderr
    import json

    train = json.loads((tmp_path / "out" / "report.json").read_text())["train"]
    assert train["steps"] == 2 and train["step"] == "traced (joint-graph, adamw)"
    assert (tmp_path / "out" / "deltas.safetensors").exists()
    # --lr would be silently unused: refused, before anything is traced or written
    r = run_cli("train", tiny_llama_path, "--recipe", recipe, "--steps", "2", "--lr", "0.1",
                "-o", tmp_path / "out2")
    assert r.returncode == 2 and "set lr in that pass" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out2").exists()

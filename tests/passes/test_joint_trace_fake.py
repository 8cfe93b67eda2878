"""joint-graph traces the training step on fake tensors: the step is not run while it is
traced (a real trace ran one whole full-fine-tuning step — every weight's gradient, every
activation — before the sparse step, which may be all that fits, ever ran)."""

from __future__ import annotations

import torch

import sparsec
from sparsec import ModelSource, parse_pass_arg, run_passes

CALLS = {"real": 0}


@torch.library.custom_op("sparsec_test::counted_scale", mutates_args=())
def counted_scale(x: torch.Tensor) -> torch.Tensor:
    CALLS["real"] += 1
    return x * 2.0


@counted_scale.register_fake
def _(x):
    return torch.empty_like(x)


counted_scale.register_autograd(lambda ctx, g: g * 2.0)


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.ops.sparsec_test.counted_scale(self.a(x)).relu())


def _program():
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    model = Model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    program = sparsec.trace(model, (x,))
    program.source = ModelSource(name="m", loss=lambda out, batch: out.square().mean(),
                                 batches=lambda: iter([(x,)] * 2))
    return program, x, state


def test_the_step_is_traced_without_running_it():
    program, x, _ = _program()
    before = CALLS["real"]
    step = run_passes(program, [parse_pass_arg("joint-graph:lr=0.01")], verify=False)
    assert CALLS["real"] == before  # traced, not run
    assert step.joint.traced_on == "fake tensors"
    assert step.history[-1].stats["traced_on"] == "fake tensors"
    loss = step.gm(x)[0]
    assert CALLS["real"] == before + 1 and torch.isfinite(loss).all()


def test_the_fake_traced_step_trains_like_eager():
    program, x, state = _program()
    step = run_passes(program, [parse_pass_arg("joint-graph:lr=0.01,optimizer=sgd")],
                      verify=True)
    model = Model()
    model.load_state_dict(state)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        want = model(x).square().mean()
        want.backward()
        opt.step()
        torch.testing.assert_close(step.gm(x)[0].reshape(()), want.detach())

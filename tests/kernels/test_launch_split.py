"""The launchers are a pure plan (the call's arguments → `Launch` descriptions, nothing run or
allocated) and `launch(plan, tensors)`; the cache replays what a launch recorded."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from sparsec.kernels import _launch  # noqa: E402
from sparsec.kernels import block_sparse_attention as fwd  # noqa: E402
from sparsec.kernels import block_sparse_attention_bwd as bwd  # noqa: E402
from sparsec.layouts import sliding_window  # noqa: E402
from sparsec.testing.kernels import rel_err  # noqa: E402


def _problem(L=48, H=2, D=16):
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, H, L, D, generator=g) for _ in range(4))
    lay = sliding_window(L, L, window=16, sink=0, block=16, causal=True)
    return q, k, v, do, lay.tensors(), (None, D ** -0.5, True, 16, 16, 0.0)


def test_forward_plan_runs_nothing_and_launch_runs_it():
    q, k, v, _, layout, rest = _problem()
    t = dict(q=q, k=k, v=v, mask=q, out=torch.full_like(q, float("nan")),
             lse=torch.full(q.shape[:3], float("nan")))
    plan = fwd.forward_plan(t, layout, *rest)
    assert torch.isnan(t["out"]).all()  # planning launched nothing
    assert plan.names() == ("q", "k", "v", "out", "lse", "mask")
    assert [plan.args[i] for i in plan.slots()] == list(plan.names())
    _launch.launch([plan], t)
    want, want_lse = fwd.block_sparse_attention_ref(q, k, v, *layout, *rest)
    assert rel_err(t["out"], want) < 1e-5 and rel_err(t["lse"], want_lse) < 1e-5


@pytest.mark.parametrize("variant, kernels", [
    ("split", ["_bwd_dq_kernel", "_bwd_dkdv_kernel"]),
    ("atomic", ["_bwd_preprocess_kernel", "_bwd_dkdv_kernel", "_dq_convert_kernel"]),
])
def test_backward_plan_lists_its_launches_in_order(variant, kernels):
    q, k, v, do, layout, rest = _problem()
    out, lse = fwd.block_sparse_attention_ref(q, k, v, *layout, *rest)
    t = bwd._outputs(dict(go=do, q=q, k=k, v=v, out=out, lse=lse, mask=None), variant)
    launches = bwd._Backward(t, layout, *rest, None).plan(variant)
    assert [getattr(x.kernel, "fn", x.kernel).__name__ for x in launches] == kernels
    _launch.launch(launches, t)
    want = fwd.block_sparse_attention_backward_ref(do, q, k, v, out, lse, *layout, *rest)
    for name, w in zip(("dq", "dk", "dv"), want):
        assert rel_err(t[name], w) < 1e-4, name


def test_bind_and_replay_use_the_named_tensors():
    calls = []
    a, b = torch.zeros(1), torch.ones(1)
    item = _launch.Launch(None, (1,), ("x", 7, "y"), {})
    assert item.bind({"x": a, "y": b}) == [a, 7, b] and item.slots() == (0, 2)
    _launch.replay([(lambda *ts: calls.append(ts), item.names())], {"x": a, "y": b})
    assert calls == [(a, b)]

"""Launch plans, direct launches and the variant switches (CPU parts; the GPU tests compare
the direct path with Triton's own launches and the eager autograd.Function with the op)."""

from __future__ import annotations

import gc
import math

import pytest
import torch

pytest.importorskip("triton")

from sparsec.errors import BadInputError  # noqa: E402
from sparsec.kernels import _triton  # noqa: E402
from sparsec.kernels._attention_common import PlanCache, plan_key  # noqa: E402
from sparsec.testing.kernels import TOL, rel_err  # noqa: E402


def test_plan_cache_drops_plans_of_dead_layouts():
    cache = PlanCache(size=4)
    lay = [torch.zeros(3, dtype=torch.int32) for _ in range(2)]
    cache.put(("k",), lay, "plan")
    assert cache.get(("k",), lay) == "plan"
    assert cache.get(("k",), [lay[0], torch.zeros(3)]) is None  # another tensor: no hit
    del lay
    gc.collect()
    assert cache.plans == {}


def test_plan_cache_is_bounded():
    cache = PlanCache(size=2)
    keep = [torch.zeros(1) for _ in range(3)]
    for i, t in enumerate(keep):
        cache.put((i,), [t], i)
    assert list(cache.plans) == [(1,), (2,)]


def test_plan_key_sees_what_specializes_a_launch():
    q = torch.randn(1, 2, 32, 16)
    lay = [torch.zeros(1, 2, 2, dtype=torch.int32)]
    base = plan_key("fwd", (q,), lay, None, (0.5,))
    assert plan_key("fwd", (q.clone(),), lay, None, (0.5,)) == base  # storage may change
    assert plan_key("fwd", (q.transpose(2, 3),), lay, None, (0.5,)) != base  # strides
    shifted = torch.empty(q.numel() + 1)[1:].view_as(q)  # same strides, not 16-byte aligned
    assert plan_key("fwd", (shifted,), lay, None, (0.5,)) != base
    assert plan_key("fwd", (q,), lay, None, (0.25,)) != base  # scalars
    lay[0].add_(1)  # in-place change of the layout: its version counter moves
    assert plan_key("fwd", (q,), lay, None, (0.5,)) != base
    assert plan_key("fwd", (q,), lay, torch.ones(32, 32, dtype=torch.bool), (0.5,)) != \
        plan_key("fwd", (q,), lay, None, (0.5,))


def test_settings_switch_and_restore():
    old = (_triton.SETTINGS.launch, _triton.SETTINGS.attn_bwd)
    with _triton.settings(launch="triton", attn_bwd="split") as s:
        assert (s.launch, s.attn_bwd) == ("triton", "split")
    assert (_triton.SETTINGS.launch, _triton.SETTINGS.attn_bwd) == old
    with pytest.raises(BadInputError, match="SPARSEC_ATTN_BWD"):
        with _triton.settings(attn_bwd="fast"):
            pass
    assert _triton.SETTINGS.attn_bwd == old[1]


def test_eager_function_matches_the_op(monkeypatch):
    """The eager autograd.Function (forced onto the interpreter's CPU tensors) gives the op's
    outputs and gradients."""
    import sparsec
    import sparsec.ops.block_sparse_attention as ops
    from sparsec.layouts import sliding_window

    monkeypatch.setattr(ops, "_on_kernel", lambda *a: True)  # the op: the kernels too
    lay = sliding_window(48, window=16, sink=16, block=16)
    g = torch.Generator().manual_seed(4)
    q, k, v, do = (torch.randn(1, 2, 48, 16, generator=g) for _ in range(4))
    results = {}
    for eager in (False, True):
        monkeypatch.setattr(ops, "_eager_kernels", lambda *a, eager=eager: eager)
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        out = sparsec.block_sparse_attention(*x, lay)
        assert (type(out.grad_fn).__name__ == "_EagerAttentionBackward") == eager
        out.backward(do)
        results[eager] = (out.detach(), *(t.grad for t in x))
    for a, b in zip(results[False], results[True]):
        assert rel_err(a, b) < 1e-6


@pytest.mark.slow
def test_direct_launches_match_tritons_offline():
    """tools/host_overhead.py --offline: Triton compiles for sm_90 through a stand-in driver
    whose launcher records its arguments; direct launches must hand it what Triton's own path
    does (forward, both backward variants). Guards the use of Triton's internals."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("Triton without its ptxas: cannot compile for sm_90")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, str(root / "tools" / "host_overhead.py"), "--offline",
                          "--length", "256", "--heads", "2", "--dim", "32", "--block", "64",
                          "--iters", "3"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0 and "direct launches match Triton's: yes" in run.stdout, \
        run.stdout[-2000:] + run.stderr[-2000:]


# GPU ----------------------------------------------------------------------------------------
def _inputs(L=1000, H=8, D=128, dtype=torch.bfloat16, seed=0):
    from sparsec.layouts import BlockLayout

    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, do = (torch.randn(1, H, L, D, device="cuda", dtype=dtype, generator=g)
                   for _ in range(4))
    n = math.ceil(L / 128)
    keep = torch.rand(1, H, n, n, generator=torch.Generator().manual_seed(seed)) < 0.4
    lay = BlockLayout.from_dense_blocks(keep, L, L, 128, 128, True).to("cuda")
    return q, k, v, do, lay


@pytest.mark.gpu
def test_gpu_direct_launches_equal_tritons(monkeypatch):
    """The stored plan replays the very kernel Triton launched: identical forward outputs and
    split-backward gradients (deterministic), atomic gradients to rounding; twice each, so
    the second call goes through the plan."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setenv("SPARSEC_AUTOTUNE", "0")
    from sparsec.kernels import block_sparse_attention as K

    q, k, v, do, lay = _inputs()
    args = (*lay.tensors(), None, 128 ** -0.5, True, 128, 128)
    with _triton.settings(launch="triton"):
        out, lse = K.block_sparse_attention(q, k, v, *args)
        want = {var: K.block_sparse_attention_backward(do, q, k, v, out, lse, *args,
                                                       variant=var)
                for var in ("split", "atomic")}
    with _triton.settings(launch="direct"):
        for _ in range(2):
            o2, l2 = K.block_sparse_attention(q, k, v, *args)
            assert torch.equal(o2, out) and torch.equal(l2, lse)
            for var, grads in want.items():
                got = K.block_sparse_attention_backward(do, q, k, v, out, lse, *args,
                                                        variant=var)
                for a, b in zip(got, grads):
                    if var == "split":
                        assert torch.equal(a, b)
                    else:  # float32 atomics add in any order
                        assert rel_err(a, b) < 1e-2


@pytest.mark.gpu
def test_gpu_eager_function_equals_op():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import sparsec

    q, k, v, do, lay = _inputs(L=700, H=4, D=64, dtype=torch.float16, seed=2)
    results = {}
    for eager in ("op", "function"):
        with _triton.settings(eager=eager, attn_bwd="split"):
            x = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            out = sparsec.block_sparse_attention(*x, lay)
            out.backward(do)
            results[eager] = (out.detach(), *(t.grad for t in x))
    for a, b in zip(results["op"], results["function"]):
        assert torch.equal(a, b)
    # and both agree with float64
    from sparsec.ops.attention_reference import block_sparse_attention_ref

    ref = block_sparse_attention_ref(q.double(), k.double(), v.double(), *lay.tensors(), None,
                                     64 ** -0.5, True, 128, 128)[0]
    assert rel_err(results["function"][0], ref) < TOL[torch.float16]

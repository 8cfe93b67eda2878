"""Block-sparse attention kernels (forward and backward) against the float64 reference.

On the CPU the kernels run under Triton's interpreter at small sizes; the same cases at real
sizes run on a GPU (`pytest -m gpu tests/kernels`). Every output buffer starts as NaN, so an
element a kernel does not write fails.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

triton = pytest.importorskip("triton")

from sparsec.kernels import block_sparse_attention as K  # noqa: E402
from sparsec.kernels._attention_common import transposed_layout  # noqa: E402
from sparsec.layouts import BlockLayout, sliding_window  # noqa: E402
from sparsec.ops.attention_reference import (  # noqa: E402
    block_sparse_attention_backward_ref,
    block_sparse_attention_ref,
)
from sparsec.testing.kernels import TOL, kernel_device, poisoned, rel_err  # noqa: E402

DEV = kernel_device()


def cfg(bm, bn, warps=4, stages=2):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def make(B, H, Hkv, L, S, D, DV, bq, bk, causal, dtype, mask, lay_dims, density, seed,
         device=DEV):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g).to(device, dtype)
    k = torch.randn(B, Hkv, S, D, generator=g).to(device, dtype)
    v = torch.randn(B, Hkv, S, DV, generator=g).to(device, dtype)
    keep = torch.rand(*lay_dims, math.ceil(L / bq), math.ceil(S / bk), generator=g) < density
    lay = BlockLayout.from_dense_blocks(keep, L, S, bq, bk, causal).to(device)
    m = None
    if mask == "bool":
        m = (torch.rand(B, 1, L, S, generator=g) > 0.3).to(device)
    elif mask == "pad":   # key padding, [B, 1, 1, S]: the last keys of batch 0 are masked
        m = torch.ones(B, 1, 1, S, dtype=torch.bool)
        m[0, ..., S - S // 3:] = False
        m = m.to(device)
    elif mask == "float":  # additive, broadcast over batch and heads, some rows all -inf
        m = torch.randn(L, S, generator=g).masked_fill(torch.rand(L, S, generator=g) < 0.3,
                                                       float("-inf"))
        m[: L // 5] = float("-inf")
        m = m.to(device, dtype)
    elif mask == "min":  # HF's additive mask: finfo.min (finite), some rows all masked
        m = torch.zeros(B, 1, L, S)
        m[..., S - S // 3:] = torch.finfo(dtype).min
        m[:, :, : L // 4] = torch.finfo(dtype).min
        m = m.to(device, dtype)
    return q, k, v, lay, m


def check(q, k, v, lay, m, causal, scale, fwd_cfg=None, bwd_cfgs=None,
          variants=("split", "atomic")):
    """Run the forward kernel and each backward variant, compare with the float64 reference
    (computed on the same device)."""
    args = (*lay.tensors(), m, scale, causal, lay.block_q, lay.block_kv)
    with poisoned():
        out, lse = K.block_sparse_attention(q, k, v, *args, config=fwd_cfg)
    d = [x.double() for x in (q, k, v)]
    ref_out, ref_lse = block_sparse_attention_ref(*d, *args)
    tol = TOL[q.dtype]
    assert rel_err(out, ref_out) < tol
    lse64 = lse.double()
    assert torch.equal(torch.isinf(lse64), torch.isinf(ref_lse))  # empty rows: -inf, out 0
    live = torch.isfinite(ref_lse)
    assert (out[~live] == 0).all()
    live &= ref_lse > -1e30  # rows masked everywhere by finfo.min: lse ~ the mask's clamp
    assert (lse64[live] - ref_lse[live]).abs().max().item() < 10 * tol
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(q.device,
                                                                                q.dtype)
    refs = block_sparse_attention_backward_ref(go.double(), *d, ref_out, ref_lse, *args)
    for variant in variants:
        with poisoned():
            grads = K.block_sparse_attention_backward(go, q, k, v, out, lse, *args,
                                                      configs=bwd_cfgs, variant=variant)
        for name, got, want in zip(("dq", "dk", "dv"), grads, refs):
            assert got.shape == want.shape and got.is_contiguous(), (variant, name)
            assert rel_err(got, want) < 2 * tol, (variant, name)


# id: B, Hq, Hkv, L, S, D, DV, bq, bk, causal, dtype, mask, layout dims, density, tiles
CPU_CASES = {
    "one-block": (1, 1, 1, 16, 16, 16, 16, 16, 16, True, torch.float32, None, (1, 1), 1.0,
                  None),
    "ragged-gqa-batch-bf16": (2, 4, 2, 37, 37, 16, 16, 16, 16, True, torch.bfloat16, None,
                              (1, 4), 0.6, None),
    "subtiles-odd-dims": (1, 2, 1, 70, 70, 24, 40, 32, 32, True, torch.float32, None, (1, 1),
                          0.7, (cfg(16, 16), (cfg(16, 16), cfg(16, 16)))),
    "cross-bool-fp16": (1, 2, 2, 45, 33, 16, 16, 32, 16, False, torch.float16, "bool",
                        (1, 2), 0.6, (cfg(16, 16), (cfg(16, 16), cfg(32, 16)))),
    "float-mask-empty-rows": (2, 2, 1, 40, 40, 16, 16, 16, 32, True, torch.float32, "float",
                              (2, 1), 0.7, None),
    "mqa-padding-empty-blocks": (2, 3, 1, 48, 48, 16, 32, 16, 16, False, torch.float32, "pad",
                                 (2, 3), 0.3, None),
    # finfo(bf16).min · log2(e) overflows float32: rows all at min must stay finite (uniform)
    "bf16-min-mask-rows-all-min": (2, 2, 2, 40, 40, 16, 16, 16, 16, False, torch.bfloat16,
                                   "min", (1, 2), 0.8, None),
}


@pytest.mark.parametrize("name", CPU_CASES)
def test_kernels_match_reference(name):
    *shape, tiles = CPU_CASES[name]
    q, k, v, lay, m = make(*shape, seed=zlib.crc32(name.encode()))
    fwd_cfg, bwd_cfgs = tiles or (None, None)
    check(q, k, v, lay, m, shape[9], 0.3, fwd_cfg, bwd_cfgs)


def test_sliding_window_layout_and_default_scale():
    lay = sliding_window(64, window=16, sink=16, block=16)
    q, k, v, _, _ = make(1, 2, 2, 64, 64, 16, 16, 16, 16, True, torch.float16, None, (1, 1),
                         1.0, seed=3)
    check(q, k, v, lay.to(DEV), None, True, 1 / 4)


def test_transposed_layout_lists_each_query_block_once():
    keep = torch.rand(2, 3, 5, 4, generator=torch.Generator().manual_seed(0)) < 0.5
    lay = BlockLayout.from_dense_blocks(keep, 80, 64, 16, 16, causal=False)
    p_ptr, p_qb, f_ptr, f_qb = transposed_layout(*lay.tensors(), 4)
    dense = lay.block_kinds()  # [B, H, NQ, NKV]
    for ptr, qbs, kind in ((p_ptr, p_qb, 1), (f_ptr, f_qb, 2)):
        for row in range(2 * 3 * 4):
            b, h, j = row // 12, (row // 4) % 3, row % 4
            got = qbs[ptr[row]:ptr[row + 1]].tolist()
            want = torch.nonzero(dense[b, h, :, j] == kind).flatten().tolist()
            assert got == want


def test_transposed_layout_cache_sees_in_place_changes():
    lay = sliding_window(64, window=16, sink=0, block=16)
    first = transposed_layout(*lay.tensors(), 4)
    assert transposed_layout(*lay.tensors(), 4) is first
    lay.full_kv_num_blocks.zero_()  # bumps the version counter
    again = transposed_layout(*lay.tensors(), 4)
    assert again is not first and int(again[2][-1]) == 0


def test_unsupported_inputs_take_the_reference_path():
    q, k, v, lay, _ = make(1, 1, 1, 20, 20, 8, 8, 16, 16, True, torch.float64, None, (1, 1),
                           1.0, seed=1)
    out, lse = K.block_sparse_attention(q, k, v, *lay.tensors(), None, 0.5, True, 16, 16)
    want, _ = block_sparse_attention_ref(q, k, v, *lay.tensors(), None, 0.5, True, 16, 16)
    assert out.dtype == torch.float64 and rel_err(out, want) < 1e-12


# GPU, real sizes ------------------------------------------------------------------------------
GPU_CASES = {  # each case is one compile of the four kernels: kept few
    "gqa-causal-bf16-d128": (2, 8, 2, 1000, 1000, 128, 128, 128, 128, True, torch.bfloat16,
                             None, (1, 8), 0.3),
    "fp32-d80-dv48-pad-mask": (2, 4, 1, 513, 513, 80, 48, 64, 32, True, torch.float32, "pad",
                               (2, 4), 0.4),
    "fp16-cross-float-mask": (1, 4, 2, 300, 450, 64, 64, 32, 64, False, torch.float16, "float",
                              (1, 1), 0.5),
}
# Autotuned on the benchmark's specialization (bf16, head dim 128, blocks of 128, causal, one
# query head per key/value head, per-head layout, lengths multiple of 16): the compiled tiles
# land in Triton's cache and tools/bench_attention.py reuses them.
BENCH_LIKE = (1, 16, 16, 2048, 2048, 128, 128, 128, 128, True, torch.bfloat16, None, (1, 16),
              0.2)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES.values(), ids=GPU_CASES.keys())
def test_gpu_kernels_match_reference(case, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setenv("SPARSEC_AUTOTUNE", "0")
    q, k, v, lay, m = make(*case, seed=11, device="cuda")
    check(q, k, v, lay, m, case[9], 1 / math.sqrt(case[5]))


@pytest.mark.gpu
def test_gpu_autotuned_kernels_match_reference(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setenv("SPARSEC_AUTOTUNE", "1")
    q, k, v, lay, m = make(*BENCH_LIKE, seed=12, device="cuda")
    check(q, k, v, lay, m, True, 1 / math.sqrt(128))


@pytest.mark.gpu
def test_gpu_op_dispatches_to_the_kernel_with_autograd():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import sparsec

    q, k, v, lay, _ = make(1, 4, 2, 300, 300, 64, 64, 64, 64, True, torch.bfloat16, None,
                           (1, 1), 0.5, seed=5, device="cuda")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = sparsec.block_sparse_attention(q, k, v, lay)
    out.float().square().sum().backward()
    want = block_sparse_attention_ref(q.double(), k.double(), v.double(), *lay.tensors(), None,
                                      1 / 8, True, 64, 64)[0]
    assert rel_err(out, want) < TOL[torch.bfloat16]
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (q, k, v))


def test_autotuned_launch_path(monkeypatch):
    """The autotuned launches (grid from the chosen tile, pruning by the layout blocks) on
    the interpreter, with a stand-in timer that runs every surviving candidate once."""
    from sparsec.kernels import block_sparse_attention_bwd as B

    calls = []

    def fake_bench(fn, quantiles=None):
        fn()
        calls.append(1)
        return [1.0, 1.0, 1.0] if quantiles else 1.0

    def tuned(kernel, configs, prune, reset=None):
        return triton.autotune(configs=configs, key=["D", "BLOCK_Q", "BLOCK_KV", "L_KEY"],
                               prune_configs_by={"early_config_prune": prune},
                               do_bench=fake_bench, reset_to_zero=reset)(kernel)
    small = [cfg(16, 16), cfg(32, 16), cfg(64, 64)]  # (64, 64) does not divide 32: pruned
    monkeypatch.setattr(K, "_bsa_fwd_tuned", tuned(K._bsa_fwd_kernel, small, K._prune_fwd),
                        raising=False)
    monkeypatch.setattr(B, "_dkdv_tuned", tuned(B._bwd_dkdv_kernel, small, B._prune),
                        raising=False)
    monkeypatch.setattr(B, "_dq_tuned", tuned(B._bwd_dq_kernel, small, B._prune),
                        raising=False)
    # the atomic dK/dV kernel adds into DQA: timing runs must not leave their sums behind
    monkeypatch.setattr(B, "_dkdv_tuned_atomic", tuned(B._bwd_dkdv_kernel, small, B._prune,
                                                       ["DQA"]), raising=False)
    monkeypatch.setattr(K, "autotune_enabled", lambda: True)
    monkeypatch.setattr(B, "autotune_enabled", lambda: True)
    q, k, v, lay, _ = make(1, 2, 1, 64, 64, 16, 16, 32, 16, True, torch.float32, None, (1, 1),
                           0.8, seed=9)
    check(q, k, v, lay, None, True, 0.25)
    assert len(calls) == 4 * 2  # two surviving candidates for each of the four kernels


def test_dq_tiles_of_128_rows_only_for_narrow_heads():
    """`_prune_dq` keeps 128-query-row dQ tiles only below head dim 128 (measured slower at
    128), and both prunes keep only tiles that divide the layout blocks."""
    from sparsec.kernels import block_sparse_attention_bwd as B

    def rows(d, bq=128):
        keep = B._prune_dq(B.DQ_CONFIGS, {}, BLOCK_Q=bq, BLOCK_KV=128, BLOCK_D=d, BLOCK_DV=d)
        return {c.kwargs["BLOCK_M"] for c in keep}
    assert max(rows(128)) == 64 and max(rows(256)) <= 64
    assert 128 in rows(64)
    assert max(rows(64, bq=32)) == 32


def test_tiles_that_cross_layout_blocks_are_refused_at_compile_time():
    """A pinned key tile wider than the layout block trips the kernel's static assert
    instead of reading the wrong block's list."""
    q, k, v, lay, _ = make(1, 1, 1, 64, 64, 16, 16, 16, 16, True, torch.float32, None, (1, 1),
                           1.0, seed=2)
    with pytest.raises(Exception, match="inside one layout block"):
        K.block_sparse_attention(q, k, v, *lay.tensors(), None, 0.25, True, 16, 16,
                                 config=cfg(16, 32))

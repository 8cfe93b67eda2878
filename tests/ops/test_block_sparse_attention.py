"""sparsec::block_sparse_attention against an independent per-row oracle, in float64."""

from __future__ import annotations

import math

import pytest
import torch

from sparsec.layouts import BlockLayout, sliding_window
from sparsec.ops.attention_reference import (
    block_sparse_attention_gathered,
    block_sparse_attention_ref,
)
from sparsec.ops.block_sparse_attention import (
    attention_backward_op,
    attention_op,
    block_sparse_attention,
)

f64 = torch.float64


def oracle(q, k, v, keep, bq, bk, causal, mask, scale):
    """Row by row: softmax over the keys the definition allows (empty row → 0).

    keep [B|1, H|1, NQ, NKV] is the block mask the layout was built from."""
    B, H, L, _ = q.shape
    S, g = k.shape[2], H // k.shape[1]
    rows = []
    for b in range(B):
        for h in range(H):
            kb, hb = min(b, keep.shape[0] - 1), min(h, keep.shape[1] - 1)
            for t in range(L):
                keys = [s for s in range(S) if keep[kb, hb, t // bq, s // bk] and
                        (not causal or s <= t) and _mask_ok(mask, b, h, t, s)]
                if not keys:
                    rows.append(torch.zeros(v.shape[-1], dtype=q.dtype))
                    continue
                idx = torch.tensor(keys)
                s_ = (k[b, h // g, idx] @ q[b, h, t]) * scale
                if mask is not None and mask.dtype != torch.bool:
                    s_ = s_ + torch.stack([_at(mask, b, h, t, s) for s in keys])
                rows.append(torch.softmax(s_, 0) @ v[b, h // g, idx])
    return torch.stack(rows).view(B, H, L, -1)


def _at(mask, b, h, t, s):
    m = mask
    while m.dim() < 4:
        m = m[None]
    return m[min(b, m.shape[0] - 1), min(h, m.shape[1] - 1), min(t, m.shape[2] - 1),
             min(s, m.shape[3] - 1)]


def _mask_ok(mask, b, h, t, s):
    if mask is None:
        return True
    val = _at(mask, b, h, t, s)
    return bool(val) if mask.dtype == torch.bool else bool(val > float("-inf"))


CASES = [
    # B, Hq, Hkv, L, S, D, bq, bk, causal, mask, layout batch/head dims
    (1, 1, 1, 16, 16, 8, 16, 16, True, None, (1, 1)),         # one block
    (2, 4, 2, 37, 37, 8, 16, 16, True, None, (1, 1)),         # ragged, GQA, batch
    (2, 4, 1, 50, 50, 8, 16, 32, True, "pad", (2, 4)),        # MQA, per-head layout, padding
    (1, 2, 2, 23, 45, 4, 16, 16, False, "float", (1, 2)),     # cross lengths, additive mask
    (2, 2, 2, 33, 33, 8, 32, 16, True, "bool", (2, 1)),       # arbitrary bool mask
    (1, 3, 1, 20, 20, 8, 16, 16, False, "neg_inf", (1, 1)),   # −inf rows → 0
]


def _inputs(case, seed=0, requires_grad=False):
    B, Hq, Hkv, L, S, D, bq, bk, causal, mask_kind, (lb, lh) = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, D, generator=g, dtype=f64)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=f64)
    v = torch.randn(B, Hkv, S, D + 1, generator=g, dtype=f64)  # Dv ≠ D on purpose
    keep = torch.rand(lb, lh, math.ceil(L / bq), math.ceil(S / bk), generator=g) < 0.6
    keep[..., 0, :] = False  # the first query block sees nothing: rows must give 0
    mask = None
    if mask_kind == "pad":
        mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
        mask[-1, ..., S - 7:] = False
    elif mask_kind == "bool":
        mask = torch.rand(B, 1, L, S, generator=g) < 0.8
    elif mask_kind == "float":
        mask = torch.randn(1, Hq, L, S, generator=g, dtype=f64)
    elif mask_kind == "neg_inf":
        mask = torch.zeros(L, S, dtype=f64)
        mask[5] = float("-inf")
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    layout = BlockLayout.from_dense_blocks(keep, L, S, bq, bk, causal)
    return q, k, v, keep, layout, mask


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}/{c[2]}L{c[3]}S{c[4]}"
                         f"b{c[6]}x{c[7]}{'c' if c[8] else ''}-{c[9]}")
def test_forward_matches_oracle(case):
    q, k, v, keep, layout, mask = _inputs(case)
    bq, bk, causal = layout.block_q, layout.block_kv, layout.causal
    scale = 0.3
    want = oracle(q, k, v, keep, bq, bk, causal, mask, scale)
    args = (q, k, v, *layout.tensors(), mask, scale, causal, bq, bk)
    out, lse = attention_op(*args)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    ref_out, ref_lse = block_sparse_attention_ref(*args)
    torch.testing.assert_close(ref_out, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-12)
    assert not torch.isnan(out).any()
    assert (out[:, :, :bq] == 0).all()  # first query block keeps no key
    assert torch.isinf(lse[:, :, :bq]).all()


@pytest.mark.parametrize("case", CASES[1:4], ids=["gqa", "mqa-pad", "float-mask"])
def test_gradients_match_oracle(case):
    q, k, v, keep, layout, mask = _inputs(case, seed=1, requires_grad=True)
    bq, bk, causal = layout.block_q, layout.block_kv, layout.causal
    out = block_sparse_attention(q, k, v, layout, attn_mask=mask, scale=0.3)
    want = oracle(q, k, v, keep, bq, bk, causal, mask, 0.3)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    exp = torch.autograd.grad(want, (q, k, v), g)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_gradcheck_small():
    q, k, v, _, layout, mask = _inputs((1, 2, 1, 20, 20, 2, 16, 16, True, "pad", (1, 2)),
                                       requires_grad=True)

    def fn(q, k, v):
        return block_sparse_attention(q, k, v, layout, attn_mask=mask)
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_dense_layout_equals_sdpa_float32():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 77, 16, generator=g)
    k, v = torch.randn(2, 2, 77, 16, generator=g), torch.randn(2, 2, 77, 16, generator=g)
    from sparsec.layouts import dense
    out = block_sparse_attention(q, k, v, dense(77, block=32))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                            enable_gqa=True)
    rel = float((out - want).abs().max() / want.abs().max())
    assert rel < 1e-5


def test_sliding_window_equals_sdpa_with_element_mask():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 90, 8, generator=g, dtype=f64) for _ in range(3))
    lay = sliding_window(90, block=16, window=20, sink=10)
    out = block_sparse_attention(q, k, v, lay)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v,
                                                            attn_mask=lay.to_element_mask())
    torch.testing.assert_close(out, want)
    dense_out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert float((out - dense_out).abs().max()) > 1e-3  # the layout really drops keys


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_computes_in_float32(dtype):
    q, k, v, keep, layout, _ = _inputs(CASES[1])
    out = block_sparse_attention(q.to(dtype), k.to(dtype), v.to(dtype), layout, scale=0.3)
    want = oracle(q, k, v, keep, 16, 16, True, None, 0.3)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)


def test_ops_pass_opcheck():
    q, k, v, _, layout, mask = _inputs(CASES[2])
    args = (q, k, v, *layout.tensors(), mask, 0.3, True, layout.block_q, layout.block_kv)
    torch.library.opcheck(attention_op, args)
    out, lse = attention_op(*args)
    torch.library.opcheck(attention_backward_op, (torch.randn_like(out), q, k, v, out, lse,
                                                  *args[3:]))


def test_strided_inputs_give_contiguous_outputs_as_the_fake_says():
    q, k, v, _, layout, _ = _inputs(CASES[1])
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    args = (qt, kt, vt, *layout.tensors(), None, 0.3, True, 16, 16)
    torch.library.opcheck(attention_op, args)
    out, lse = attention_op(*args)
    torch.library.opcheck(attention_backward_op, (torch.randn_like(out), qt, kt, vt, out, lse,
                                                  *args[3:]))


def test_backward_is_an_op_in_the_joint_graph():
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_function
    from torch._functorch.partitioners import default_partition

    q, k, v, _, layout, _ = _inputs(CASES[1], requires_grad=True)
    seen = []

    def compiler(gm, _):
        seen.extend(str(n.target) for n in gm.graph.nodes)
        return make_boxed_func(gm)

    fn = aot_function(lambda q, k, v, *lay: attention_op(q, k, v, *lay, None, 0.3, True, 16,
                                                         16)[0],
                      fw_compiler=compiler, bw_compiler=compiler,
                      partition_fn=default_partition)
    fn(q, k, v, *layout.tensors()).sum().backward()
    assert "sparsec.block_sparse_attention.default" in seen
    assert "sparsec.block_sparse_attention_backward.default" in seen


def test_gathered_path_reads_only_kept_blocks():
    """NaNs in skipped key blocks cannot reach the output: the skip is real."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 1, 64, 8, generator=g, dtype=f64)
    k, v = torch.randn(1, 1, 64, 8, generator=g, dtype=f64), torch.randn(1, 1, 64, 8,
                                                                         generator=g, dtype=f64)
    lay = sliding_window(64, block=16, window=16, sink=0)  # blocks (i, i-1) and (i, i)
    k_poison, v_poison = k.clone(), v.clone()
    k_poison[:, :, :16] = float("nan")  # block 0 is never read by query block 3
    v_poison[:, :, :16] = float("nan")
    out, _ = block_sparse_attention_gathered(q, k_poison, v_poison, *lay.tensors(), None, 0.3,
                                             True, 16, 16)
    assert not torch.isnan(out[:, :, 48:]).any()
    torch.testing.assert_close(out[:, :, 48:], block_sparse_attention(q, k, v, lay, scale=0.3)
                               [:, :, 48:])


@pytest.mark.gpu
def test_cuda_matches_cpu_and_never_syncs():
    """On a GPU: the op (kernel or fallback) equals the float64 CPU oracle, and dynamic
    selection + attention run with CUDA's sync debug mode set to error."""
    from sparsec.ops.block_select import block_scores_op, select_blocks_op

    q, k, v, keep, layout, mask = _inputs(CASES[2])
    want = oracle(q, k, v, keep, layout.block_q, layout.block_kv, True, mask, 0.3)
    dev = torch.device("cuda")
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        out = block_sparse_attention(q.to(dev, dtype), k.to(dev, dtype), v.to(dev, dtype),
                                     layout.to(dev), attn_mask=mask.to(dev), scale=0.3)
        torch.testing.assert_close(out.double().cpu(), want, rtol=tol, atol=tol)
    qc, kc, vc = q.to(dev, torch.float16), k.to(dev, torch.float16), v.to(dev, torch.float16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        probs = block_scores_op(qc, kc, 0.3, True, 16, 16)
        lay = select_blocks_op(probs, q.shape[2], k.shape[2], True, 16, 16, 2, 0.0, 16, 16)
        attention_op(qc, kc, vc, *lay, None, 0.3, True, 16, 16)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _qkv(device, dtype, d=16):
    return [torch.randn(1, 2, 32, d, device=device, dtype=dtype) for _ in range(3)]


def test_select_impl_names_why_the_reference_runs_on_the_cpu():
    from sparsec.ops.block_sparse_attention import select_impl

    impl, why = select_impl(*_qkv("cpu", torch.float32), 16, 16)
    assert impl == "reference" and "CUDA" in why


@pytest.mark.gpu
def test_select_impl_on_cuda_picks_the_kernel_unless_it_cannot():
    """One decision for the op and the eager path: float64, odd blocks and references_only()
    go to the reference, with the reason; the eager call then runs the op, not the kernels'
    autograd.Function."""
    from sparsec.kernels import references_only
    from sparsec.ops.block_sparse_attention import select_impl

    dev = torch.device("cuda")
    assert select_impl(*_qkv(dev, torch.bfloat16), 16, 16) == ("kernel", "")
    assert "dtype" in select_impl(*_qkv(dev, f64), 16, 16)[1]
    assert "blocks" in select_impl(*_qkv(dev, torch.bfloat16), 8, 16)[1]
    with references_only():
        assert "references_only" in select_impl(*_qkv(dev, torch.bfloat16), 16, 16)[1]
    lay = sliding_window(32, window=16, sink=0, block=16).to(dev)
    for dtype, eager in ((torch.bfloat16, True), (f64, False)):
        x = [t.requires_grad_() for t in _qkv(dev, dtype)]
        out = block_sparse_attention(*x, lay)
        assert (type(out.grad_fn).__name__ == "_EagerAttentionBackward") == eager
        out.sum().backward()
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in x)

"""Block-sparse attention on Triton: the forward here, the backward in
`block_sparse_attention_bwd` (both launchers are exported from this module, which is what
`sparsec.ops.block_sparse_attention` looks up).

Forward (flash-attention style): one program per (query tile of BLOCK_M rows, batch·query
head). It walks its query block's *full* list (no element masks) and then its *partial* list
(causal diagonal, ragged last key block: masked), each listed key block in BLOCK_N-row
sub-tiles, with an online softmax in base 2; it writes out and the logsumexp lse. Rows that
see no key give 0 and lse −inf. GQA: query head h reads key/value head h // (Hq / Hkv).
BLOCK_M divides block_q and BLOCK_N divides block_kv, so a tile never straddles two layout
blocks. float32 inputs use IEEE-precision dots (no tf32), so fp32 results match the reference
to ~1e-6; float16/bfloat16 run the tensor cores with float32 accumulation. The optional element
mask (bool or float, broadcastable to [B, Hq, L, S]) is applied in the kernel, on every block.
A soft-cap (SOFTCAP, a constexpr: the uncapped kernel is unchanged) maps the scaled scores
through softcap·tanh(s / softcap) before the mask is added.
"""

import torch

from ..ops.attention_reference import (
    block_sparse_attention_backward_ref,
    block_sparse_attention_gathered,
    block_sparse_attention_ref,
)
from . import _attention_common as _ac
from ._attention_common import (
    LN2,
    bias_base2,
    capped_scores,
    head_block,
    kernel_supports,
    key_subtile,
    layout_args,
    load_rows,
    mask_args,
    mma,
    plan_key,
    query_tile,
    score_args,
)
from ._launch import Launch, replay
from ._triton import HAS_TRITON, autotune_enabled, cdiv, next_pow2, tl, triton

__all__ = ["HAS_TRITON", "block_sparse_attention_ref", "block_sparse_attention_backward_ref",
           "block_sparse_attention", "block_sparse_attention_backward", "forward_config",
           "FWD_CONFIGS"]


# kernel -----------------------------------------------------------------------------------
@triton.jit
def _fwd_list(acc, m_i, l_i, q, k_base, v_base, mask_base, n_listed, idx_ptr, idx_stride,
              offs_m, m_last, L, S, qk_scale, cap2, stride_kn, stride_kd, stride_vn, stride_vd,
              stride_maskm, stride_maskn,
              D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_DV: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
              FP32: tl.constexpr, PARTIAL: tl.constexpr, SOFTCAP: tl.constexpr):
    """Online softmax over one block list (full or partial) of a query tile."""
    tl.static_assert(BLOCK_KV % BLOCK_N == 0, "a key tile lies inside one layout block")
    SUBS: tl.constexpr = BLOCK_KV // BLOCK_N
    # rows can be all -inf only where something masks them
    GUARD: tl.constexpr = PARTIAL or MASK_KIND != 0
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for it in range(0, n_listed * SUBS):
        n0, live = key_subtile(it, idx_ptr, idx_stride, S, m_last, BLOCK_KV, BLOCK_N, CAUSAL,
                               PARTIAL)
        if live:
            offs_n = n0 + tl.arange(0, BLOCK_N)
            k = load_rows(k_base, offs_n, S, offs_d, stride_kn, stride_kd, D, BLOCK_D, PARTIAL)
            s = mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), FP32)
            s, _ = capped_scores(s, qk_scale, cap2, SOFTCAP)
            if PARTIAL:
                ok = offs_n[None, :] < S
                if CAUSAL:
                    ok = ok & (offs_n[None, :] <= offs_m[:, None])
            if MASK_KIND != 0:
                in_range = (offs_m[:, None] < L) & (offs_n[None, :] < S)
                mv = tl.load(mask_base + offs_m[:, None].to(tl.int64) * stride_maskm
                             + offs_n[None, :] * stride_maskn,
                             mask=in_range, other=0)
                if MASK_KIND == 1:
                    allowed = mv != 0
                else:
                    s = s + bias_base2(mv)
                    allowed = in_range
                if PARTIAL:
                    ok = ok & allowed
                else:
                    ok = allowed
            if GUARD:
                s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            if GUARD:  # a row with nothing visible yet keeps m = -inf; use 0 as its shift
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_use = m_new
            p = tl.math.exp2(s - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = load_rows(v_base, offs_n, S, offs_dv, stride_vn, stride_vd, DV, BLOCK_DV, PARTIAL)
            acc = mma(p.to(v.dtype), v, acc * alpha[:, None], FP32)
            m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _bsa_fwd_kernel(Q, K, V, Out, Lse, Num, Idx, FNum, FIdx, Mask,
                    qk_scale, cap2, L, S, H, G,
                    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn,
                    stride_kd, stride_vb, stride_vh, stride_vn, stride_vd,
                    stride_ob, stride_oh, stride_om, stride_od,
                    stride_numb, stride_numh, stride_numm, stride_idxb, stride_idxh, stride_idxm,
                    stride_idxw,
                    stride_fnumb, stride_fnumh, stride_fnumm, stride_fidxb, stride_fidxh,
                    stride_fidxm, stride_fidxw,
                    stride_maskb, stride_maskh, stride_maskm, stride_maskn,
                    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_DV: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr,
                    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, FP32: tl.constexpr,
                    SOFTCAP: tl.constexpr, L_KEY, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    bh, b, h, hk, m0, qb, offs_m = query_tile(H, G, BLOCK_M, BLOCK_Q)
    m_last = tl.minimum(m0 + BLOCK_M, L) - 1
    b64 = b.to(tl.int64)
    q = load_rows(Q + b64 * stride_qb + h.to(tl.int64) * stride_qh, offs_m, L,
                  tl.arange(0, BLOCK_D),
                  stride_qm, stride_qd, D, BLOCK_D, True)
    k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh
    mask_base = Mask + b64 * stride_maskb + h.to(tl.int64) * stride_maskh
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    n_full = tl.load(FNum + b * stride_fnumb + h * stride_fnumh + qb * stride_fnumm)
    acc, m_i, l_i = _fwd_list(acc, m_i, l_i, q, k_base, v_base, mask_base, n_full,
                              FIdx + b * stride_fidxb + h * stride_fidxh + qb * stride_fidxm,
                              stride_fidxw, offs_m, m_last, L, S,
                              qk_scale, cap2, stride_kn, stride_kd, stride_vn, stride_vd,
                              stride_maskm, stride_maskn, D, DV, BLOCK_D,
                              BLOCK_DV, BLOCK_KV, BLOCK_M, BLOCK_N, CAUSAL, MASK_KIND, FP32, False,
                              SOFTCAP)
    n_part = tl.load(Num + b * stride_numb + h * stride_numh + qb * stride_numm)
    acc, m_i, l_i = _fwd_list(acc, m_i, l_i, q, k_base, v_base, mask_base, n_part,
                              Idx + b * stride_idxb + h * stride_idxh + qb * stride_idxm,
                              stride_idxw, offs_m, m_last, L, S,
                              qk_scale, cap2, stride_kn, stride_kd, stride_vn, stride_vd,
                              stride_maskm, stride_maskn, D, DV, BLOCK_D,
                              BLOCK_DV, BLOCK_KV, BLOCK_M, BLOCK_N, CAUSAL, MASK_KIND, FP32, True,
                              SOFTCAP)
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    offs_dv = tl.arange(0, BLOCK_DV)
    o_ptrs = Out + b64 * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_om + \
        offs_dv[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty),
             mask=(offs_m[:, None] < L) & (offs_dv[None, :] < DV))
    tl.store(Lse + bh.to(tl.int64) * L + offs_m, lse, mask=offs_m < L)


# tile choices -----------------------------------------------------------------------------
def _fwd_configs():
    out = []
    # (128, 64, 4 warps) spills on sm_90 at head dim 128 (tools/kernel_report.py): left out
    for bm, bn, warps, stages in ((128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2),
                                  (64, 64, 4, 3), (64, 128, 4, 3), (64, 32, 4, 4),
                                  (32, 32, 4, 3), (16, 16, 2, 3)):
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps,
                                 num_stages=stages))
    return out


FWD_CONFIGS = _fwd_configs() if HAS_TRITON else []


def _fits(bm: int, bn: int, block_q: int, block_kv: int) -> bool:
    return block_q % bm == 0 and block_kv % bn == 0


def _prune_fwd(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    bq, bkv, d = args["BLOCK_Q"], args["BLOCK_KV"], max(args["BLOCK_D"], args["BLOCK_DV"])
    keep = [c for c in configs if _fits(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], bq, bkv)
            and (d <= 128 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64)]
    return keep or [forward_config(bq, bkv, d)]


def forward_config(block_q: int, block_kv: int, d: int):
    """The heuristic tile (used without autotuning): 64 x 64 with 4 warps, two CTAs per SM —
    on the H100 at head dim 128 it was the fastest forward tile at 4k and 16k and within 1% of
    (128, 128, 8) at 32k (tools/ab_attention_tiles.py), where (128, 64, 8), the earlier
    heuristic, was 4-8% slower."""
    return triton.Config({"BLOCK_M": min(block_q, 64), "BLOCK_N": min(block_kv, 64)},
                         num_warps=4, num_stages=3)


if HAS_TRITON:
    _bsa_fwd_tuned = triton.autotune(
        configs=FWD_CONFIGS,
        key=["D", "DV", "BLOCK_Q", "BLOCK_KV", "CAUSAL", "MASK_KIND", "FP32", "SOFTCAP",
             "L_KEY"],
        prune_configs_by={"early_config_prune": _prune_fwd},
    )(_bsa_fwd_kernel)


# launcher ---------------------------------------------------------------------------------
_PLANS = _ac.PlanCache()


def forward_plan(t: dict, layout, attn_mask, scale, causal, block_q, block_kv, softcap,
                 config=None) -> Launch:
    """The forward launch for the call's tensors `t` (q, k, v, out, lse, mask: the kernel's
    view of `attn_mask`), decided without launching: kernel (autotuned or pinned), grid,
    arguments and meta-parameters."""
    q, k, v, out = t["q"], t["k"], t["v"], t["out"]
    B, H, L, D = q.shape
    hkv, S, DV = k.shape[1], k.shape[2], v.shape[-1]
    num, idx, pstr = layout_args(layout[0], layout[1], B, H)
    fnum, fidx, fstr = layout_args(layout[2], layout[3], B, H)
    _, mstr, kind = mask_args(attn_mask, B, H, L, S, q)
    bd, bdv = head_block(D), head_block(DV)
    args = ("q", "k", "v", "out", "lse", num, idx, fnum, fidx, "mask",
            *score_args(scale, softcap), L, S, H, H // hkv, *q.stride(), *k.stride(),
            *v.stride(), *out.stride(), *pstr, *fstr, *mstr)
    meta = dict(D=D, DV=DV, BLOCK_D=bd, BLOCK_DV=bdv, BLOCK_Q=block_q, BLOCK_KV=block_kv,
                CAUSAL=bool(causal), MASK_KIND=kind, FP32=q.dtype == torch.float32,
                SOFTCAP=bool(softcap), L_KEY=next_pow2(L))
    if config is None and autotune_enabled():
        def grid(m):
            return (cdiv(L, m["BLOCK_M"]), B * H)
        return Launch(_bsa_fwd_tuned, grid, args, meta)
    cfg = config or forward_config(block_q, block_kv, max(bd, bdv))
    meta.update(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return Launch(_bsa_fwd_kernel, (cdiv(L, cfg.kwargs["BLOCK_M"]), B * H), args, meta)


def _tensors(q, k, v, attn_mask) -> dict:
    """The call's per-call tensors by name: inputs, fresh outputs and the mask as the kernel
    reads it (q stands in for no mask)."""
    B, H, L = q.shape[:3]
    mask = q if attn_mask is None else \
        mask_args(attn_mask, B, H, L, k.shape[2], q)[0]
    return dict(q=q, k=k, v=v, mask=mask,
                out=_ac.empty(B, H, L, v.shape[-1], dtype=q.dtype, device=q.device),
                lse=_ac.empty(B, H, L, dtype=torch.float32, device=q.device))


def block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks,
                           full_kv_indices, attn_mask, scale, causal, block_q, block_kv,
                           softcap=0.0, *, config=None):
    """(out [B, Hq, L, Dv], lse [B, Hq, L]): the op `sparsec::block_sparse_attention` on the
    Triton kernel. Inputs the kernel does not take (float64, odd blocks, CPU tensors outside
    the interpreter) run the gathered-block reference. `config` pins a tile
    (a `triton.Config`), bypassing autotuning. A repeated call (same layout tensors, shapes,
    strides, dtypes) replays its stored launch (`_launch.py`)."""
    layout = (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)
    key = None
    device = _ac.launch_device(q) if config is None else None
    if device is not None:
        key = plan_key("fwd", (q, k, v), layout, attn_mask,
                       (float(scale), bool(causal), block_q, block_kv, float(softcap)))
        stored = _PLANS.get(key, layout)
        if stored is not None:
            t = _tensors(q, k, v, attn_mask)
            replay(stored[1], t)
            return t["out"], t["lse"]
    if kernel_supports(q, k, v, block_q, block_kv) is not None:
        return block_sparse_attention_gathered(q, k, v, *layout, attn_mask, scale, causal,
                                               block_q, block_kv, softcap)
    t = _tensors(q, k, v, attn_mask)
    if q.shape[2] == 0 or q.shape[0] * q.shape[1] == 0:
        return t["out"], t["lse"]
    plan = forward_plan(t, layout, attn_mask, scale, causal, block_q, block_kv, softcap, config)
    _ac.launch_cached(_PLANS, key, layout, [plan], t, device)
    return t["out"], t["lse"]


def block_sparse_attention_backward(*args, **kwargs):
    """(dq, dk, dv) for `sparsec::block_sparse_attention_backward`; the kernels and their
    launcher are in `block_sparse_attention_bwd` (looked up at call time)."""
    from . import block_sparse_attention_bwd

    return block_sparse_attention_bwd.block_sparse_attention_backward(*args, **kwargs)


_ = (LN2, block_sparse_attention_ref, block_sparse_attention_backward_ref)  # re-exported

"""Block-sparse attention backward on Triton: dq, dk, dv from the saved out and lse.

Two launches, no atomics (the result is deterministic):
1. `_bwd_dq_kernel`: one program per (query tile, batch·query head) walking the key lists as the
   forward does; it first makes its rows' delta = rowsum(dO · O) in float32 and stores it;
2. `_bwd_dkdv_kernel`: one program per (key tile of BLOCK_N rows, batch·key/value head); it walks
   the query blocks that list its key block — the *transposed* layout, a CSR built on the device
   without host sync and cached per layout — for every query head of its GQA group, so dk and dv
   are summed over the group inside the program; it reads the delta of step 1.
The "atomic" variant instead makes delta (and zeroes a float32 dQ accumulator) in
`_bwd_preprocess_kernel`, adds dS·K into dQ atomically inside the dK/dV kernel and converts.
Probabilities are recomputed from lse (base 2 inside); rows whose lse is −inf (they saw no key)
contribute nothing. Full blocks skip element masks; partial blocks mask the causal diagonal and
the ragged tails; the optional element mask applies everywhere. With a soft-cap (SOFTCAP) the
scores are recomputed through softcap·tanh(s / softcap) and dS is multiplied by 1 − tanh² on
its way to dQ and dK. With BIAS_GRAD the dQ kernel also stores dS (the gradient of the float
mask, a bias) into a zeroed float32 [B, Hq, L, S] buffer — each (query, key) pair is visited once
there, so no atomics — and the split variant runs. Both flags are constexprs: without them the
kernels are the plain ones.
"""

import torch

from ..ops.attention_reference import block_sparse_attention_backward_ref
from . import _attention_common as _ac
from . import _triton
from ._attention_common import (
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
    transposed_layout,
)
from ._launch import Launch, launch, replay
from ._triton import HAS_TRITON, autotune_enabled, cdiv, next_pow2, no_sync_allowed, tl, triton

__all__ = ["block_sparse_attention_backward", "dkdv_config", "dq_config", "DKDV_CONFIGS",
           "DQ_CONFIGS", "ATOMIC_CONFIGS"]


@triton.jit
def _bwd_preprocess_kernel(Out, DO, Delta, DQA, L, H, stride_ob, stride_oh, stride_om, stride_od,
                           stride_dob, stride_doh, stride_dom, stride_dod,
                           D: tl.constexpr, BLOCK_D: tl.constexpr, DV: tl.constexpr,
                           BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                           ZERO_DQ: tl.constexpr):
    """delta = rowsum(dO·O); with ZERO_DQ also zeroes the rows of the float32 dQ
    accumulator the atomic backward adds into (one launch instead of a memset)."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DV)
    o = load_rows(Out + b * stride_ob + h * stride_oh, offs_m, L, offs_d, stride_om, stride_od, DV,
                  BLOCK_DV, True)
    do = load_rows(DO + b * stride_dob + h * stride_doh, offs_m, L, offs_d, stride_dom, stride_dod,
                   DV, BLOCK_DV, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh.to(tl.int64) * L + offs_m, delta, mask=offs_m < L)
    if ZERO_DQ:
        cols = tl.arange(0, BLOCK_D)
        rows = bh.to(tl.int64) * L + offs_m
        tl.store(DQA + rows[:, None] * D + cols[None, :],
                 tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32),
                 mask=(offs_m[:, None] < L) & (cols[None, :] < D))


@triton.jit
def _dq_convert_kernel(DQA, DQ, n, scale, BLOCK: tl.constexpr):
    """dq = scale · dq_acc in dq's dtype (the atomic backward's last step)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(DQA + offs, mask=offs < n, other=0.0)
    tl.store(DQ + offs, (x * scale).to(DQ.dtype.element_ty), mask=offs < n)


@triton.jit
def _load_lse2(Lse_row, offs, L):
    """lse in base 2, +inf for rows that saw no key (and rows past L), so exp2(s - lse) = 0."""
    lse = tl.load(Lse_row + offs, mask=offs < L, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


# dK, dV -----------------------------------------------------------------------------------
@triton.jit
def _dkdv_list(dk, dv, k, v, q_base, do_base, lse_row, delta_row, mask_base, dqa_row, start,
               end, qblocks, n0, offs_n, L, S, qk_scale, cap2, stride_qm, stride_qd, stride_dom,
               stride_dod, stride_maskm, stride_maskn,
               D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_DV: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
               FP32: tl.constexpr, PARTIAL: tl.constexpr, ATOMIC_DQ: tl.constexpr,
               SOFTCAP: tl.constexpr):
    """Accumulate dk, dv of one key tile over the query blocks qblocks[start:end]; with
    ATOMIC_DQ also add dS·K of every pair into the float32 dQ rows (unscaled)."""
    tl.static_assert(BLOCK_Q % BLOCK_M == 0, "a query tile lies inside one layout block")
    SUBS: tl.constexpr = BLOCK_Q // BLOCK_M
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for it in range(start * SUBS, end * SUBS):
        qb = tl.load(qblocks + it // SUBS)
        m0 = qb * BLOCK_Q + (it % SUBS) * BLOCK_M
        # Full lists test nothing at run time: a branch around the loads would keep the
        # software pipeliner from overlapping them with the products (rows past L, in the
        # ragged last query block, load as zeros with lse +inf and add nothing).
        live = True
        if PARTIAL:
            live = m0 < L
            if CAUSAL:  # query sub-tile entirely before this key tile: nothing visible
                live = live & (m0 + BLOCK_M - 1 >= n0)
        if live:
            offs_m = m0 + tl.arange(0, BLOCK_M)
            q = load_rows(q_base, offs_m, L, offs_d, stride_qm, stride_qd, D, BLOCK_D, True)
            do = load_rows(do_base, offs_m, L, offs_dv, stride_dom, stride_dod, DV, BLOCK_DV, True)
            lse2 = _load_lse2(lse_row, offs_m, L)
            st = mma(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), FP32)
            st, tt = capped_scores(st, qk_scale, cap2, SOFTCAP)  # [BLOCK_N, BLOCK_M]
            if MASK_KIND == 2:
                mv = tl.load(mask_base + offs_m[None, :].to(tl.int64) * stride_maskm
                             + offs_n[:, None] * stride_maskn,
                             mask=(offs_m[None, :] < L) & (offs_n[:, None] < S), other=0)
                st = st + bias_base2(mv)
            pt = tl.math.exp2(st - lse2[None, :])
            if PARTIAL:
                ok = offs_n[:, None] < S
                if CAUSAL:
                    ok = ok & (offs_n[:, None] <= offs_m[None, :])
                pt = tl.where(ok, pt, 0.0)
            if MASK_KIND == 1:
                mv = tl.load(mask_base + offs_m[None, :].to(tl.int64) * stride_maskm
                             + offs_n[:, None] * stride_maskn,
                             mask=(offs_m[None, :] < L) & (offs_n[:, None] < S), other=0)
                pt = tl.where(mv != 0, pt, 0.0)
            delta = tl.load(delta_row + offs_m, mask=offs_m < L, other=0.0)
            dv = mma(pt.to(do.dtype), do, dv, FP32)
            dpt = mma(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), FP32)
            dst = pt * (dpt - delta[None, :])
            if SOFTCAP:  # through softcap · tanh(s / softcap)
                dst = dst * (1.0 - tt * tt)
            dst = dst.to(q.dtype)
            dk = mma(dst, q, dk, FP32)
            if ATOMIC_DQ:  # dS·K for these query rows, added to the shared accumulator
                dq = mma(tl.trans(dst), k, tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32),
                         FP32)
                tl.atomic_add(dqa_row + offs_m[:, None].to(tl.int64) * D + offs_d[None, :], dq,
                              mask=(offs_m[:, None] < L) & (offs_d[None, :] < D),
                              sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, Lse, Delta, DK, DV_, DQA, PPtr, PQb, FPtr, FQb, Mask,
                     qk_scale, cap2, sm_scale, L, S, H, G, HKV, NKV, row_b, row_h,
                     stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn,
                     stride_kd, stride_vb, stride_vh, stride_vn, stride_vd,
                     stride_dob, stride_doh, stride_dom, stride_dod, stride_maskb, stride_maskh,
                     stride_maskm, stride_maskn,
                     D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DV: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr,
                     CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, FP32: tl.constexpr,
                     ATOMIC_DQ: tl.constexpr, SOFTCAP: tl.constexpr, L_KEY,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # program 0 is key block 0, which a causal layout lists most: heaviest tiles go first
    tl.static_assert(BLOCK_KV % BLOCK_N == 0, "a key tile lies inside one layout block")
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // HKV
    hk = bhk % HKV
    n0 = pid_n * BLOCK_N
    kvb = n0 // BLOCK_KV
    offs_n = n0 + tl.arange(0, BLOCK_N)
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    hk64 = hk.to(tl.int64)
    k = load_rows(K + b64 * stride_kb + hk64 * stride_kh, offs_n, S, offs_d, stride_kn,
                  stride_kd, D, BLOCK_D, True)
    v = load_rows(V + b64 * stride_vb + hk64 * stride_vh, offs_n, S, offs_dv, stride_vn,
                  stride_vd, DV, BLOCK_DV, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(0, G):
        h = hk * G + g
        h64 = h.to(tl.int64)
        q_base = Q + b64 * stride_qb + h64 * stride_qh
        do_base = DO + b64 * stride_dob + h64 * stride_doh
        row_off = (b64 * H + h64) * L
        mask_base = Mask + b64 * stride_maskb + h64 * stride_maskh
        row = b * row_b + h * row_h + kvb
        dqa_row = DQA + row_off * D
        dk, dv = _dkdv_list(dk, dv, k, v, q_base, do_base, Lse + row_off, Delta + row_off,
                            mask_base, dqa_row, tl.load(FPtr + row), tl.load(FPtr + row + 1),
                            FQb, n0, offs_n, L, S, qk_scale, cap2, stride_qm, stride_qd, stride_dom,
                            stride_dod, stride_maskm, stride_maskn,
                            D, DV, BLOCK_D, BLOCK_DV, BLOCK_Q, BLOCK_M, BLOCK_N, CAUSAL,
                            MASK_KIND, FP32, False, ATOMIC_DQ, SOFTCAP)
        dk, dv = _dkdv_list(dk, dv, k, v, q_base, do_base, Lse + row_off, Delta + row_off,
                            mask_base, dqa_row, tl.load(PPtr + row), tl.load(PPtr + row + 1),
                            PQb, n0, offs_n, L, S, qk_scale, cap2, stride_qm, stride_qd, stride_dom,
                            stride_dod, stride_maskm, stride_maskn,
                            D, DV, BLOCK_D, BLOCK_DV, BLOCK_Q, BLOCK_M, BLOCK_N, CAUSAL,
                            MASK_KIND, FP32, True, ATOMIC_DQ, SOFTCAP)
    dk = dk * sm_scale
    out_row = (b64 * HKV + hk.to(tl.int64)) * S
    tl.store(DK + (out_row + offs_n[:, None]) * D + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=(offs_n[:, None] < S) & (offs_d[None, :] < D))
    tl.store(DV_ + (out_row + offs_n[:, None]) * DV + offs_dv[None, :],
             dv.to(DV_.dtype.element_ty), mask=(offs_n[:, None] < S) & (offs_dv[None, :] < DV))


# dQ ---------------------------------------------------------------------------------------
@triton.jit
def _dq_list(dq, q, do, lse2, delta, k_base, v_base, mask_base, db_base, n_listed, idx_ptr,
             idx_stride, offs_m, m_last, L, S, qk_scale, cap2, stride_kn, stride_kd, stride_vn,
             stride_vd, stride_maskm, stride_maskn,
             D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
             BLOCK_KV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, FP32: tl.constexpr,
             PARTIAL: tl.constexpr, SOFTCAP: tl.constexpr, BIAS_GRAD: tl.constexpr):
    tl.static_assert(BLOCK_KV % BLOCK_N == 0, "a key tile lies inside one layout block")
    SUBS: tl.constexpr = BLOCK_KV // BLOCK_N
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for it in range(0, n_listed * SUBS):
        n0, live = key_subtile(it, idx_ptr, idx_stride, S, m_last, BLOCK_KV, BLOCK_N, CAUSAL,
                               PARTIAL)
        if live:
            offs_n = n0 + tl.arange(0, BLOCK_N)
            k = load_rows(k_base, offs_n, S, offs_d, stride_kn, stride_kd, D, BLOCK_D, PARTIAL)
            v = load_rows(v_base, offs_n, S, offs_dv, stride_vn, stride_vd, DV, BLOCK_DV, PARTIAL)
            s = mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), FP32)
            s, t = capped_scores(s, qk_scale, cap2, SOFTCAP)
            if MASK_KIND == 2:
                mv = tl.load(mask_base + offs_m[:, None].to(tl.int64) * stride_maskm
                             + offs_n[None, :] * stride_maskn,
                             mask=(offs_m[:, None] < L) & (offs_n[None, :] < S), other=0)
                s = s + bias_base2(mv)
            p = tl.math.exp2(s - lse2[:, None])
            if PARTIAL:
                ok = offs_n[None, :] < S
                if CAUSAL:
                    ok = ok & (offs_n[None, :] <= offs_m[:, None])
                p = tl.where(ok, p, 0.0)
            if MASK_KIND == 1:
                mv = tl.load(mask_base + offs_m[:, None].to(tl.int64) * stride_maskm
                             + offs_n[None, :] * stride_maskn,
                             mask=(offs_m[:, None] < L) & (offs_n[None, :] < S), other=0)
                p = tl.where(mv != 0, p, 0.0)
            dp = mma(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), FP32)
            ds = p * (dp - delta[:, None])
            if BIAS_GRAD:  # dS is the bias's gradient: 0 where p is (outside kept pairs)
                tl.store(db_base + offs_m[:, None].to(tl.int64) * S + offs_n[None, :], ds,
                         mask=(offs_m[:, None] < L) & (offs_n[None, :] < S))
            if SOFTCAP:
                ds = ds * (1.0 - t * t)
            dq = mma(ds.to(k.dtype), k, dq, FP32)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, Out, Lse, Delta, DQ, Num, Idx, FNum, FIdx, Mask, DB,
                   qk_scale, cap2, sm_scale, L, S, H, G,
                   stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn,
                   stride_kd, stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_dob, stride_doh, stride_dom, stride_dod, stride_ob, stride_oh, stride_om,
                   stride_od,
                   stride_numb, stride_numh, stride_numm, stride_idxb, stride_idxh, stride_idxm,
                   stride_idxw,
                   stride_fnumb, stride_fnumh, stride_fnumm, stride_fidxb, stride_fidxh,
                   stride_fidxm, stride_fidxw,
                   stride_maskb, stride_maskh, stride_maskm, stride_maskn,
                   D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DV: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr,
                   CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, FP32: tl.constexpr,
                   SOFTCAP: tl.constexpr, BIAS_GRAD: tl.constexpr, L_KEY,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh, b, h, hk, m0, qb, offs_m = query_tile(H, G, BLOCK_M, BLOCK_Q)
    m_last = tl.minimum(m0 + BLOCK_M, L) - 1
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q = load_rows(Q + b64 * stride_qb + h64 * stride_qh, offs_m, L, tl.arange(0, BLOCK_D),
                  stride_qm, stride_qd, D,
                  BLOCK_D, True)
    do = load_rows(DO + b64 * stride_dob + h64 * stride_doh, offs_m, L, tl.arange(0, BLOCK_DV),
                   stride_dom, stride_dod,
                   DV, BLOCK_DV, True)
    row_off = bh.to(tl.int64) * L
    lse2 = _load_lse2(Lse + row_off, offs_m, L)
    # delta = rowsum(dO·O) of these rows, made here (the dK/dV kernel, launched after this
    # one, reads it): no separate pass over O and dO
    o = load_rows(Out + b64 * stride_ob + h64 * stride_oh, offs_m, L, tl.arange(0, BLOCK_DV),
                  stride_om, stride_od, DV,
                  BLOCK_DV, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + row_off + offs_m, delta, mask=offs_m < L)
    k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh
    mask_base = Mask + b64 * stride_maskb + h64 * stride_maskh
    db_base = DB + row_off * S
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_full = tl.load(FNum + b * stride_fnumb + h * stride_fnumh + qb * stride_fnumm)
    full = FIdx + b * stride_fidxb + h * stride_fidxh + qb * stride_fidxm
    n_part = tl.load(Num + b * stride_numb + h * stride_numh + qb * stride_numm)
    part = Idx + b * stride_idxb + h * stride_idxh + qb * stride_idxm
    dq = _dq_list(dq, q, do, lse2, delta, k_base, v_base, mask_base, db_base, n_full, full,
                  stride_fidxw, offs_m, m_last, L, S, qk_scale, cap2, stride_kn, stride_kd,
                  stride_vn, stride_vd, stride_maskm, stride_maskn, D, DV, BLOCK_D, BLOCK_DV,
                  BLOCK_KV, BLOCK_M, BLOCK_N, CAUSAL, MASK_KIND, FP32, False, SOFTCAP,
                  BIAS_GRAD)
    dq = _dq_list(dq, q, do, lse2, delta, k_base, v_base, mask_base, db_base, n_part, part,
                  stride_idxw, offs_m, m_last, L, S, qk_scale, cap2, stride_kn, stride_kd,
                  stride_vn, stride_vd, stride_maskm, stride_maskn, D, DV, BLOCK_D, BLOCK_DV,
                  BLOCK_KV, BLOCK_M, BLOCK_N, CAUSAL, MASK_KIND, FP32, True, SOFTCAP,
                  BIAS_GRAD)
    dq = dq * sm_scale
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(DQ + (row_off + offs_m[:, None]) * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=(offs_m[:, None] < L) & (offs_d[None, :] < D))


# tile choices -----------------------------------------------------------------------------
def _configs(shapes):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in shapes]


# dK/dV: BLOCK_N key rows stay resident, BLOCK_M query rows stream; dQ: the reverse.
# dK/dV holds two fp32 accumulators of BLOCK_N x head dim: 8 warps where they are large.
# (64, 128, 8 warps) — FlexAttention's sm90 tile — spills 72 bytes at head dim 128 with
# Triton 3.6 (tools/kernel_report.py); (64, 64, 4 warps, 2 stages) spills 80 bytes but two of
# its CTAs fit on an SM (255 registers x 128 threads, 99 KB of shared memory each), so one's
# products run while the other does its exponentials: measured the fastest dK/dV tile at 4k,
# 16k and 32k (H100, head dim 128, whole backward timed interleaved with every candidate,
# tools/ab_attention_tiles.py: 3-7% under (64, 128, 8, 3), which the autotuner had picked).
# Spilling tiles stay candidates on purpose: on the GPU the autotuner, not the register
# count, decides whether they pay.
DKDV_CONFIGS = _configs(((64, 64, 4, 2), (64, 128, 8, 3), (64, 128, 8, 2), (32, 128, 8, 3),
                         (32, 128, 8, 2), (64, 64, 8, 3), (32, 64, 8, 3), (32, 64, 4, 3),
                         (32, 64, 4, 2), (16, 64, 4, 3), (32, 32, 4, 3), (16, 16, 2, 3))
                        ) if HAS_TRITON else []
# the atomic variant's dK/dV kernel also holds a [BLOCK_M, head dim] float32 dQ tile: at head
# dim 128 (64, 64, 8) and (32, 64, 4) spill with Triton 3.6 (kernel_report.py) and are left
# out; (64, 128, 8, 2) spills 160 bytes and stays, as in DKDV_CONFIGS
ATOMIC_CONFIGS = _configs(((64, 128, 8, 2), (32, 128, 8, 3), (32, 128, 8, 2), (16, 128, 8, 3),
                           (16, 64, 4, 3), (32, 32, 4, 3), (16, 16, 2, 3))
                          ) if HAS_TRITON else []
# dQ tiles of 128 query rows are left out at head dims of 128 and more (`_prune_dq`): in the same
# interleaved timing they were 4-8% slower than (64, 64, 4) at 4k, 16k and 32k, yet the
# autotuner, timing each kernel alone, had picked (128, 64, 8, 3) at 32k.
DQ_CONFIGS = _configs(((64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 8, 3), (128, 32, 8, 3),
                       (128, 64, 8, 2), (64, 32, 4, 3), (64, 16, 4, 3), (32, 32, 4, 3),
                       (16, 16, 2, 3))
                      ) if HAS_TRITON else []


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    bq, bkv = args["BLOCK_Q"], args["BLOCK_KV"]
    wide = max(args["BLOCK_D"], args["BLOCK_DV"]) > 128
    keep = [c for c in configs if bq % c.kwargs["BLOCK_M"] == 0 and
            bkv % c.kwargs["BLOCK_N"] == 0 and
            (not wide or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64)]
    return keep or [_fallback(bq, bkv)]


def _prune_dq(configs, named_args, **kwargs):
    """`_prune`, and no dQ tiles of 128 query rows at head dims of 128 and more (above)."""
    args = {**named_args, **kwargs}
    if max(args["BLOCK_D"], args["BLOCK_DV"]) >= 128:
        configs = [c for c in configs if c.kwargs["BLOCK_M"] <= 64]
    return _prune(configs, named_args, **kwargs)


def _fallback(block_q, block_kv):
    return triton.Config({"BLOCK_M": min(16, block_q), "BLOCK_N": min(16, block_kv)},
                         num_warps=2, num_stages=2)


def dkdv_config(block_q: int, block_kv: int, d: int):
    """The tile used without autotuning: the fastest measured (above), smaller for wide heads."""
    if d <= 128:
        return triton.Config({"BLOCK_M": min(block_q, 64), "BLOCK_N": min(block_kv, 64)},
                             num_warps=4, num_stages=2)
    return triton.Config({"BLOCK_M": min(block_q, 32), "BLOCK_N": min(block_kv, 64)},
                         num_warps=4, num_stages=3)


def dq_config(block_q: int, block_kv: int, d: int):
    """The tile used without autotuning: (64, 64, 4 warps), the fastest measured at head dim
    128; narrower key tiles for wider heads."""
    bn = min(block_kv, 64 if d <= 128 else 32)
    return triton.Config({"BLOCK_M": min(block_q, 64), "BLOCK_N": bn}, num_warps=4,
                         num_stages=3)


_KEY = ["D", "DV", "BLOCK_Q", "BLOCK_KV", "CAUSAL", "MASK_KIND", "FP32", "SOFTCAP", "L_KEY"]
if HAS_TRITON:
    _dkdv_tuned = triton.autotune(configs=DKDV_CONFIGS, key=_KEY,
                                  prune_configs_by={"early_config_prune": _prune}
                                  )(_bwd_dkdv_kernel)
    # the atomic variant adds into the dQ accumulator: every timed run starts from zero
    _dkdv_tuned_atomic = triton.autotune(configs=ATOMIC_CONFIGS, key=_KEY,
                                         prune_configs_by={"early_config_prune": _prune},
                                         reset_to_zero=["DQA"])(_bwd_dkdv_kernel)
    _dq_tuned = triton.autotune(configs=DQ_CONFIGS, key=[*_KEY, "BIAS_GRAD"],
                                prune_configs_by={"early_config_prune": _prune_dq}
                                )(_bwd_dq_kernel)


# launcher ---------------------------------------------------------------------------------
_PLANS = _ac.PlanCache()
_VARIANTS = ("split", "atomic")


class _Backward:
    """The backward's plan for one call: from its tensors by name (`t`, for shapes and
    strides) and the arguments both variants share, `plan(variant)` lists the launches
    without running them."""

    def __init__(self, t, layout, attn_mask, scale, causal, block_q, block_kv, softcap,
                 configs):
        q, k, v = t["q"], t["k"], t["v"]
        B, H, L, D = q.shape
        hkv, S, DV = k.shape[1], k.shape[2], v.shape[-1]
        self.t, self.configs, self.launches = t, configs, []
        self.shape = (B, H, L, D, hkv, S, DV)
        self.bd, self.bdv = head_block(D), head_block(DV)
        self.mask_name = "q" if attn_mask is None else "mask"
        _, self.mstr, kind = mask_args(attn_mask, B, H, L, S, q)
        self.meta = dict(D=D, DV=DV, BLOCK_D=self.bd, BLOCK_DV=self.bdv, BLOCK_Q=block_q,
                         BLOCK_KV=block_kv, CAUSAL=bool(causal), MASK_KIND=kind,
                         FP32=q.dtype == torch.float32, SOFTCAP=bool(softcap),
                         L_KEY=next_pow2(L))
        self.scale = float(scale)
        self.qk_scale, self.cap2 = score_args(scale, softcap)
        self.bias_grad = "dbias" in t
        self.blocks = (block_q, block_kv)
        self.nkv = cdiv(S, block_kv)
        num, idx, fnum, fidx = layout
        self.transposed = transposed_layout(num, idx, fnum, fidx, self.nkv)
        bl, hl = num.shape[:2]
        self.rows = (hl * self.nkv if bl > 1 else 0, self.nkv if hl > 1 else 0)
        self.lists = (*layout_args(num, idx, B, H), *layout_args(fnum, fidx, B, H))

    def go(self, kernel, grid, args, meta):
        """Add a launch; arguments given as strings are the named per-call tensors."""
        self.launches.append(Launch(kernel, grid, args, meta))

    def pinned(self, which):
        """The pinned tile of the dK/dV (0) or dQ (1) kernel, or None to autotune."""
        if self.configs is not None:
            return self.configs[which]
        if autotune_enabled():
            return None
        bq, bkv = self.blocks
        d = max(self.bd, self.bdv)
        return dkdv_config(bq, bkv, d) if which == 0 else dq_config(bq, bkv, d)

    def kernel(self, plain, tuned, pinned, rows, rows_meta, bh, args, **extra):
        meta = dict(self.meta, **extra)
        if pinned is None:
            self.go(tuned, lambda m: (cdiv(rows, m[rows_meta]), bh), args, meta)
        else:
            meta.update(pinned.kwargs, num_warps=pinned.num_warps, num_stages=pinned.num_stages)
            self.go(plain, (cdiv(rows, pinned.kwargs[rows_meta]), bh), args, meta)

    def plan(self, variant) -> list[Launch]:
        """The launches of `variant` ("split" or "atomic"), in order."""
        B, H, L, D, hkv, S, DV = self.shape
        t = self.t
        atomic = variant == "atomic"
        if atomic:  # delta, and the float32 dQ accumulator zeroed
            self.go(_bwd_preprocess_kernel, (cdiv(L, 64), B * H),
                    ("out", "go", "delta", "dqa", L, H, *t["out"].stride(),
                     *t["go"].stride()),
                    dict(D=D, BLOCK_D=self.bd, DV=DV, BLOCK_DV=self.bdv, BLOCK_M=64,
                         ZERO_DQ=True))
        else:  # dQ first: it writes delta, which the dK/dV kernel reads
            self.dq()
        p_ptr, p_qb, f_ptr, f_qb = self.transposed
        args = ("q", "k", "v", "go", "lse", "delta", "dk", "dv", "dqa" if atomic else "q",
                p_ptr, p_qb, f_ptr, f_qb, self.mask_name, self.qk_scale, self.cap2, self.scale,
                L, S, H,
                H // hkv, hkv, self.nkv, *self.rows, *t["q"].stride(), *t["k"].stride(),
                *t["v"].stride(), *t["go"].stride(), *self.mstr)
        self.kernel(_bwd_dkdv_kernel, _dkdv_tuned_atomic if atomic else _dkdv_tuned,
                    self.pinned(0), S, "BLOCK_N", B * hkv, args, ATOMIC_DQ=atomic)
        if atomic:
            n = B * H * L * D
            self.go(_dq_convert_kernel, (cdiv(n, 1024),), ("dqa", "dq", n, self.scale),
                    dict(BLOCK=1024))
        return self.launches

    def dq(self):
        B, H, L, D, hkv, S, DV = self.shape
        t = self.t
        num, idx, pstr, fnum, fidx, fstr = self.lists
        args = ("q", "k", "v", "go", "out", "lse", "delta", "dq", num, idx, fnum, fidx,
                self.mask_name, "dbias" if self.bias_grad else "q", self.qk_scale, self.cap2,
                self.scale, L, S, H, H // hkv,
                *t["q"].stride(), *t["k"].stride(), *t["v"].stride(), *t["go"].stride(),
                *t["out"].stride(), *pstr, *fstr, *self.mstr)
        self.kernel(_bwd_dq_kernel, _dq_tuned, self.pinned(1), L, "BLOCK_M", B * H, args,
                    BIAS_GRAD=self.bias_grad)


def _outputs(t, variant, bias_grad=False) -> dict:
    """Allocate the call's outputs and scratch into the tensor dict `t` (with `bias_grad`,
    the zeroed float32 dS buffer the dQ kernel fills)."""
    q, k, v = t["q"], t["k"], t["v"]
    B, H, L, D = q.shape
    t["dq"] = _ac.empty(B, H, L, D, dtype=q.dtype, device=q.device)
    t["dk"] = _ac.empty(*k.shape, dtype=k.dtype, device=k.device)
    t["dv"] = _ac.empty(*v.shape, dtype=v.dtype, device=v.device)
    t["delta"] = _ac.empty(B, H, L, dtype=torch.float32, device=q.device)
    if variant == "atomic":
        t["dqa"] = torch.empty(B, H, L, D, dtype=torch.float32, device=q.device)
    if bias_grad:
        t["dbias"] = torch.zeros(B, H, L, k.shape[2], dtype=torch.float32, device=q.device)
    return t


def _time_variant(call, reps: int = 5) -> float:
    """Median device time of `call()` in ms (the call is warm: compiled and tuned)."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


_CHOICES: dict[tuple, str] = {}


def _choose(tensors, args) -> str:
    """'split' or 'atomic', whichever runs this shape faster (both compiled and tuned first),
    decided once per shapes, dtype, blocks, causality, mask kind and layout list widths
    (not per layout: a selector's new layout every step must not time again); without
    device timing (graph capture, sync debugging) 'split'."""
    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    layout, mask = args[0], args[1]
    key = (q.shape, k.shape, v.shape, q.dtype, q.device, *args[3:7],
           None if mask is None else (mask.dtype, mask.shape), *(t.shape for t in layout))
    if key in _CHOICES:
        return _CHOICES[key]
    if not q.is_cuda or no_sync_allowed():
        return "split"
    times = {}
    for variant in _VARIANTS:
        def call(variant=variant):
            t = _outputs(dict(tensors), variant)
            launch(_Backward(t, *args).plan(variant), t)
        call()
        times[variant] = _time_variant(call)
    _CHOICES[key] = min(times, key=times.get)
    return _CHOICES[key]


def block_sparse_attention_backward(grad_out, q, k, v, out, lse, kv_num_blocks, kv_indices,
                                    full_kv_num_blocks, full_kv_indices, attn_mask, scale,
                                    causal, block_q, block_kv, softcap=0.0, *, configs=None,
                                    variant=None, bias_grad=False):
    """(dq, dk, dv), contiguous, for `sparsec::block_sparse_attention_backward`. `configs`
    = (dkdv config, dq config) pins the tiles, bypassing autotuning; `variant` "split" or
    "atomic" overrides `SETTINGS.attn_bwd` (the atomic variant runs the dK/dV kernel with
    atomic dQ; its pinned tile is configs[0]). A repeated call reuses its stored plan.
    `bias_grad` (a float `attn_mask`) adds a fourth result, dS as float32 [B, Hq, L, S] (0
    outside the kept pairs; the caller sums it to the mask's shape), and runs "split"."""
    layout = (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)
    if bias_grad and (attn_mask is None or attn_mask.dtype == torch.bool):
        raise ValueError("bias_grad needs a float attn_mask")
    variant = "split" if bias_grad else (variant or _triton.SETTINGS.attn_bwd)
    device = _ac.launch_device(q) if configs is None else None
    key = None
    if device is not None:
        key = plan_key("bwd", (grad_out, q, k, v, out, lse), layout, attn_mask,
                       (float(scale), bool(causal), block_q, block_kv, variant,
                        float(softcap), bool(bias_grad)))
        stored = _PLANS.get(key, layout)
        if stored is not None:
            chosen, recorded = stored
            t = _outputs(dict(go=grad_out, q=q, k=k, v=v, out=out, lse=lse.float().contiguous(),
                              mask=attn_mask), chosen, bias_grad)
            replay(recorded, t)
            return _results(t, bias_grad)
    args = (grad_out, q, k, v, out, lse, *layout, attn_mask, scale, causal, block_q, block_kv,
            softcap)
    if kernel_supports(q, k, v, block_q, block_kv) is not None:
        return _reference(args, bias_grad)
    tensors = dict(go=grad_out, q=q, k=k, v=v, out=out, lse=lse.float().contiguous(),
                   mask=attn_mask)
    B, H, L, _ = q.shape
    if B * H == 0 or k.shape[2] == 0 or L == 0:
        t = _outputs(tensors, "split", bias_grad)
        t["dk"].zero_(), t["dv"].zero_()
        return _results(t, bias_grad)
    rest = (layout, attn_mask, scale, causal, block_q, block_kv, softcap, configs)
    if variant == "auto":
        variant = _choose(tensors, rest)
    if variant not in _VARIANTS:
        raise ValueError(f"backward variant {variant!r}: use one of {_VARIANTS} or 'auto'")
    t = _outputs(tensors, variant, bias_grad)
    _ac.launch_cached(_PLANS, key, layout, _Backward(t, *rest).plan(variant), t, device,
                      tag=variant)
    return _results(t, bias_grad)


def _results(t, bias_grad):
    grads = (t["dq"], t["dk"], t["dv"])
    return (*grads, t["dbias"]) if bias_grad else grads


def _reference(args, bias_grad):
    """The reference backward for inputs the kernels do not take (dS unreduced with
    `bias_grad`, as the kernels return it)."""
    if not bias_grad:
        return block_sparse_attention_backward_ref(*args)
    from ..ops.attention_reference import block_sparse_attention_backward_ds

    *grads, ds = block_sparse_attention_backward_ds(*args)
    return (*grads, ds.contiguous())

"""Dynamic block selection on the device: pooled-QK block scores and top-k / threshold
selection into the four layout tensors, with no host synchronization.

Three launches per selection, each one pass over its input:
- `_pool_kernel` (twice: q and k): the float32 mean of each block of rows;
- `_scores_kernel`: per (batch·query head, tile of query blocks), the pooled q·kᵀ logits
  (IEEE float32 dots, scaled, invalid causal blocks masked) and their softmax over key blocks,
  fused: the logits never reach memory (two sweeps over the pooled keys: max and sum, then
  normalize and write);
- `_select_kernel`: per (batch·head, query block), the candidates (valid, not forced) sorted
  by score (descending, ties by block index: the reference's stable sort) as packed int64 keys,
  the top-k budget and the threshold mass (prefix sums in sorted order), then the kept blocks
  written straight into the partial and full lists, ascending, padded with 0.

Semantics are those of `sparsec.layouts.dynamic` (`pooled_block_scores`, `select_from_scores`),
which stay the reference and the CPU path; output widths are `selection_widths`. The
threshold's prefix sums are a parallel scan, so a block whose cumulative mass lands within
float32 rounding of the threshold may be decided differently from torch's cumsum.
Vertical-slash selection stays in PyTorch (`select_vertical_slash`).
"""

import functools

import torch

from ..layouts.block_layout import block_geometry
from ..layouts.dynamic import (
    forced_blocks,
    pooled_block_scores,
    select_from_scores,
    selection_widths,
)
from . import _attention_common as _ac
from ._attention_common import head_block
from ._triton import HAS_TRITON, cdiv, next_pow2, on_cuda, tl, triton

__all__ = ["HAS_TRITON", "block_scores_ref", "select_blocks_ref", "block_scores",
           "select_blocks", "MAX_KV_BLOCKS"]

# The select kernel sorts one row of key blocks in registers: beyond this it uses the reference.
MAX_KV_BLOCKS = 4096

block_scores_ref = pooled_block_scores


def select_blocks_ref(scores, q_len, kv_len, causal, block_q, block_kv, topk, threshold, sink,
                      window):
    """`sparsec::select_blocks` in plain torch (argument order of the op)."""
    return select_from_scores(scores, q_len, kv_len, block_q, block_kv, causal, topk,
                              threshold, sink, window)


# kernels ----------------------------------------------------------------------------------
@triton.jit
def _pool_kernel(X, Out, N, H, stride_xb, stride_xh, stride_xn, stride_xd, D: tl.constexpr,
                 BLOCK_D: tl.constexpr,
                 BLOCK: tl.constexpr, ROWS: tl.constexpr):
    i = tl.program_id(0)
    bh = tl.program_id(1)
    base = X + (bh // H).to(tl.int64) * stride_xb + (bh % H).to(tl.int64) * stride_xh
    cols = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r0 in tl.static_range(0, BLOCK, ROWS):
        rows = i * BLOCK + r0 + tl.arange(0, ROWS)
        x = tl.load(base + rows[:, None] * stride_xn + cols[None, :] * stride_xd,
                    mask=(rows[:, None] < N) & (cols[None, :] < D), other=0.0)
        acc += tl.sum(x.to(tl.float32), 0)
    count = tl.minimum(N - i * BLOCK, BLOCK)
    out = Out + (bh.to(tl.int64) * tl.num_programs(0) + i) * D + cols
    tl.store(out, acc / count.to(tl.float32), mask=cols < D)


@triton.jit
def _scores_kernel(QP, KP, Out, scale, L, NQ, NKV, H, G, HKV,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BQ: tl.constexpr,
                   BK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_I: tl.constexpr,
                   BLOCK_J: tl.constexpr, CHUNK_D: tl.constexpr):
    bh = tl.program_id(1)
    b = bh // H
    hk = (bh % H) // G
    rows = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    qp_base = QP + bh.to(tl.int64) * NQ * D
    kp_base = KP + (b * HKV + hk).to(tl.int64) * NKV * D
    q_last = tl.minimum((rows + 1) * BQ, L) - 1
    m = tl.full([BLOCK_I], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_I], dtype=tl.float32)
    for j0 in range(0, NKV, BLOCK_J):
        logit = _logits(qp_base, kp_base, rows, j0, q_last, scale, NQ, NKV, D, BLOCK_D, BK,
                        CAUSAL, BLOCK_I, BLOCK_J, CHUNK_D)
        m_new = tl.maximum(m, tl.max(logit, 1))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(logit - m_new[:, None]), 1)
        m = m_new
    out_row = Out + (bh.to(tl.int64) * NQ + rows[:, None]) * NKV
    for j0 in range(0, NKV, BLOCK_J):
        logit = _logits(qp_base, kp_base, rows, j0, q_last, scale, NQ, NKV, D, BLOCK_D, BK,
                        CAUSAL, BLOCK_I, BLOCK_J, CHUNK_D)
        cols = j0 + tl.arange(0, BLOCK_J)
        p = tl.exp(logit - m[:, None]) / total[:, None]
        tl.store(out_row + cols[None, :], p, mask=(rows[:, None] < NQ) & (cols[None, :] < NKV))


@triton.jit
def _logits(qp_base, kp_base, rows, j0, q_last, scale, NQ, NKV, D: tl.constexpr,
            BLOCK_D: tl.constexpr, BK: tl.constexpr, CAUSAL: tl.constexpr,
            BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, CHUNK_D: tl.constexpr):
    """Scaled pooled logits of key blocks j0..j0+BLOCK_J, -inf where the block is invalid;
    the head dim is summed in chunks (IEEE float32 dots) to keep the operands in registers."""
    cols = j0 + tl.arange(0, BLOCK_J)
    logit = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    for d0 in tl.static_range(0, BLOCK_D, CHUNK_D):
        cd = d0 + tl.arange(0, CHUNK_D)
        qp = tl.load(qp_base + rows[:, None] * D + cd[None, :],
                     mask=(rows[:, None] < NQ) & (cd[None, :] < D), other=0.0)
        kp = tl.load(kp_base + cols[:, None] * D + cd[None, :],
                     mask=(cols[:, None] < NKV) & (cd[None, :] < D), other=0.0)
        logit = tl.dot(qp, tl.trans(kp), logit, input_precision="ieee")
    logit = logit * scale
    ok = cols[None, :] < NKV
    if CAUSAL:
        ok = ok & (cols[None, :] * BK <= q_last[:, None])
    return tl.where(ok, logit, float("-inf"))


@triton.jit
def _select_kernel(P, Kind, Num, Idx, FNum, FIdx, NKV, H, budget, threshold,
                   stride_pb, stride_ph, stride_pi, stride_pj, WP, WF,
                   NKVP: tl.constexpr, WPP: tl.constexpr, WFP: tl.constexpr,
                   THRESHOLD: tl.constexpr):
    i = tl.program_id(0)
    bh = tl.program_id(1)
    nq = tl.num_programs(0)
    j = tl.arange(0, NKVP)
    in_row = j < NKV
    p = tl.load(P + (bh // H).to(tl.int64) * stride_pb + (bh % H).to(tl.int64) * stride_ph
                + i * stride_pi + j * stride_pj, mask=in_row, other=0.0).to(tl.float32)
    kind = tl.load(Kind + i * NKV + j, mask=in_row, other=0)
    valid = (kind & 1) != 0
    partial = (kind & 2) != 0
    forced = (kind & 4) != 0
    cand = valid & (~forced)
    s = tl.where(cand, p, float("-inf"))
    # float -> order-preserving unsigned key, descending, ties by ascending index (stable)
    bits = s.to(tl.int32, bitcast=True).to(tl.int64)
    mag = bits & 0x7FFFFFFF
    order = tl.where(bits >= 0, mag + 2147483648, 2147483647 - mag)
    hi = tl.where(cand, 4294967295 - order, 4294967296)
    key = (hi << 20) | j.to(tl.int64)
    ranked = tl.sort(key, 0)
    sv = tl.gather(s, (ranked & 0xFFFFF).to(tl.int32), 0)   # scores in descending order
    rank = tl.arange(0, NKVP)
    take = (rank < budget) & (sv > float("-inf"))
    if THRESHOLD:
        mass = tl.sum(tl.where(forced, p, 0.0), 0)
        pos = tl.where(sv > 0.0, sv, 0.0)
        before = tl.cumsum(pos, 0) - pos
        take = take & (mass + before < threshold)
    # the taken blocks are a prefix of the ranking: everything up to the last taken key
    last = tl.max(tl.where(take, ranked, -1), 0)
    keep = ((cand & (key <= last)) | forced) & valid
    part = (keep & partial).to(tl.int32)
    full = (keep & (~partial)).to(tl.int32)
    row = bh.to(tl.int64) * nq + i
    _write_list(Num + row, Idx + row * WP, part, j, WP, WPP)
    _write_list(FNum + row, FIdx + row * WF, full, j, WF, WFP)


@triton.jit
def _write_list(num_ptr, idx_ptr, sel, j, W, WPAD: tl.constexpr):
    """Ascending block indices where sel is 1, the first W of them, then 0 padding (the two
    stores cover disjoint slots, so their order does not matter)."""
    pos = tl.cumsum(sel, 0) - sel
    tl.store(idx_ptr + pos, j, mask=(sel != 0) & (pos < W))
    count = tl.minimum(tl.sum(sel, 0), W)
    w = tl.arange(0, WPAD)
    tl.store(idx_ptr + w, tl.zeros([WPAD], dtype=tl.int32), mask=(w >= count) & (w < W))
    tl.store(num_ptr, count)


# launchers --------------------------------------------------------------------------------
def _usable(*tensors) -> bool:
    return on_cuda(*tensors)


def _pool(x: torch.Tensor, block: int) -> torch.Tensor:
    b, h, n, d = x.shape
    nb = cdiv(n, block)
    out = _ac.empty(b, h, nb, d, dtype=torch.float32, device=x.device)
    _pool_kernel[(nb, b * h)](x, out, n, h, *x.stride(), D=d, BLOCK_D=head_block(d),
                              BLOCK=block, ROWS=min(block, 32))
    return out


def block_scores(q, k, scale, causal, block_q, block_kv):
    """`sparsec::block_scores` on the device: float32 [B, Hq, NQ, NKV] probabilities."""
    if not _usable(q, k) or q.dtype == torch.float64 or q.shape[-1] > 256 or \
            q.shape[2] == 0 or k.shape[2] == 0:
        return pooled_block_scores(q, k, scale, causal, block_q, block_kv).float()
    b, h, L, d = q.shape
    hkv = k.shape[1]
    nq, nkv = cdiv(L, block_q), cdiv(k.shape[2], block_kv)
    qp, kp = _pool(q, block_q), _pool(k, block_kv)
    out = _ac.empty(b, h, nq, nkv, dtype=torch.float32, device=q.device)
    block_i = 16 if nq <= 16 else 32
    block_j = min(32, max(16, next_pow2(nkv)))
    _scores_kernel[(cdiv(nq, block_i), b * h)](
        qp, kp, out, float(scale), L, nq, nkv, h, h // hkv, hkv, D=d, BLOCK_D=head_block(d),
        BQ=block_q, BK=block_kv, CAUSAL=bool(causal), BLOCK_I=block_i, BLOCK_J=block_j,
        CHUNK_D=min(32, head_block(d)), num_warps=4)
    return out


@functools.lru_cache(maxsize=64)
def _kinds(q_len, kv_len, block_q, block_kv, causal, sink, window, device) -> torch.Tensor:
    """int8 [NQ, NKV]: bit 1 valid, 2 partial (needs masks), 4 forced (sink or window).
    Shapes only, built on the device once per geometry."""
    valid, partial = block_geometry(q_len, kv_len, block_q, block_kv, causal, device)
    forced = forced_blocks(q_len, kv_len, block_q, block_kv, causal, sink, window, device)
    return (valid.to(torch.int8) | (partial.to(torch.int8) << 1) |
            (forced.to(torch.int8) << 2)).contiguous()


def select_blocks(scores, q_len, kv_len, causal, block_q, block_kv, topk, threshold, sink,
                  window):
    """`sparsec::select_blocks` on the device: (num, idx, full_num, full_idx), int32, with the
    reference's fixed widths."""
    b, h, nq, nkv = scores.shape
    if not _usable(scores) or nkv > MAX_KV_BLOCKS or b * h * nq == 0:
        return select_blocks_ref(scores, q_len, kv_len, causal, block_q, block_kv, topk,
                                 threshold, sink, window)
    wp, wf = selection_widths(q_len, kv_len, block_q, block_kv, causal, topk, threshold, sink,
                              window)
    kinds = _kinds(q_len, kv_len, block_q, block_kv, bool(causal), sink, window,
                   scores.device)
    i32 = torch.int32
    num = _ac.empty(b, h, nq, dtype=i32, device=scores.device)
    fnum = _ac.empty(b, h, nq, dtype=i32, device=scores.device)
    # a list of width 0 still needs an address for the kernel: allocate one slot, return none
    idx = _ac.empty(b, h, nq, max(wp, 1), dtype=i32, device=scores.device)
    fidx = _ac.empty(b, h, nq, max(wf, 1), dtype=i32, device=scores.device)
    budget = min(topk if topk > 0 else nkv, nkv)
    nkvp = max(16, next_pow2(nkv))
    _select_kernel[(nq, b * h)](
        scores, kinds, num, idx, fnum, fidx, nkv, h, budget, float(threshold),
        *scores.stride(), wp, wf, NKVP=nkvp, WPP=max(16, next_pow2(wp)),
        WFP=max(16, next_pow2(wf)), THRESHOLD=threshold > 0,
        num_warps=4 if nkvp <= 1024 else 8)
    return num, idx[..., :wp], fnum, fidx[..., :wf]

"""ONNX translations of the dynamic block-selection ops (`sparsec.ops.block_select`).

They follow `sparsec.layouts.dynamic` step for step, so the layout chosen in onnxruntime is the
one PyTorch chooses: pooled-QK block scores; top-k (ONNX TopK breaks ties towards the lower
index, as the reference's stable sort) or the cumulative score mass; vertical-slash from the
last query block's attention (diagonal sums by the pad-and-reshape skew, columns by a
reduction); then the kept-block mask compressed into the four layout tensors with the same
fixed widths. Everything that depends only on shapes and options (block geometry, the forced
sink/window blocks, slash ranges) is computed here on the host and embedded as constants.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..layouts.block_layout import block_geometry, host_tensors
from ..layouts.dynamic import forced_blocks, selection_widths, vertical_slash_widths
from ..layouts.static import block_ranges
from .onnx_common import NEG_INF, cast_to, const, ints, ir, np_type, op, static_dims, work_type

__all__ = ["block_scores_onnx", "select_blocks_onnx", "select_vertical_slash_onnx"]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _geometry(q_len: int, kv_len: int, bq: int, bk: int, causal: bool):
    with host_tensors():
        valid, partial = block_geometry(q_len, kv_len, bq, bk, causal, "cpu")
    return _np(valid), _np(partial)


def _forced(q_len, kv_len, bq, bk, causal, sink, window) -> np.ndarray:
    with host_tensors():
        return _np(forced_blocks(q_len, kv_len, bq, bk, causal, sink, window, "cpu"))


def _pool(x, rows: int, block: int, work):
    """Mean over each block of rows of x [B, H, N, D] (ragged last block: its own rows)."""
    nb = math.ceil(rows / block)
    d = static_dims(x)[3]
    x = cast_to(x, work)
    if nb * block != rows:
        x = op.Pad(x, ints(0, 0, 0, 0, 0, 0, nb * block - rows, 0))
    sums = op.ReduceSum(op.Reshape(x, ints(0, 0, nb, block, d)), ints(3), keepdims=0)
    counts = np.minimum(rows - np.arange(nb) * block, block).reshape(nb, 1)
    return op.Div(sums, const(counts, np_type(work)))


def _grouped_logits(qx, kx, hq: int, hkv: int, rows: int, cols: int, scale: float, work):
    """(qx [B, Hq, rows, D] @ kx [B, Hkv, cols, D]ᵀ) · scale as [B, Hq, rows, cols]: each
    key/value head is read once for its group of query heads."""
    q5 = op.Reshape(qx, ints(0, hkv, hq // hkv, rows, -1))
    k5 = op.Unsqueeze(kx, ints(2))
    logits = op.MatMul(q5, op.Transpose(k5, perm=[0, 1, 2, 4, 3]))
    logits = op.Mul(logits, const(scale, np_type(work)))
    return op.Reshape(logits, ints(0, hq, rows, cols))


def block_scores_onnx(q, k, scale: float, causal: bool, block_q: int, block_kv: int):
    qd, kd = static_dims(q), static_dims(k)
    hq, L, hkv, S = qd[1], qd[2], kd[1], kd[2]
    work = work_type(q.dtype)
    nq, nkv = math.ceil(L / block_q), math.ceil(S / block_kv)
    qp = _pool(q, L, block_q, work)
    kp = _pool(k, S, block_kv, work)
    logits = _grouped_logits(qp, kp, hq, hkv, nq, nkv, scale, work)
    valid, _ = _geometry(L, S, block_q, block_kv, causal)
    logits = op.Where(const(valid), logits, const(NEG_INF, np_type(work)))
    return cast_to(op.Softmax(logits, axis=-1), ir.DataType.FLOAT)


# the kept-block mask → layout tensors ----------------------------------------------------------
def _compress(keep, width: int, nkv: int):
    """(counts int32 [..], indices int32 [.., width]): ascending kept columns, padded with 0."""
    counts = op.ReduceSum(op.Cast(keep, to=ir.DataType.INT32), ints(-1), keepdims=0)
    if width == 0:
        shape = op.Concat(op.Shape(keep, start=0, end=3), ints(0), axis=0)
        return counts, op.Cast(op.ConstantOfShape(shape), to=ir.DataType.INT32)
    counts = op.Min(counts, const(width, np.int32))
    cols = const(np.arange(nkv), np.int64)
    key = op.Where(keep, cols, const(nkv, np.int64))
    order, _ = op.TopK(key, ints(min(width, nkv)), axis=-1, largest=0, sorted=1)
    if width > nkv:
        order = op.Pad(order, ints(0, 0, 0, 0, 0, 0, 0, width - nkv), const(nkv, np.int64))
    idx = op.Where(op.Less(order, const(nkv, np.int64)), order, const(0, np.int64))
    return counts, op.Cast(idx, to=ir.DataType.INT32)


def _to_layout(keep, q_len, kv_len, bq, bk, causal, widths):
    valid, partial = _geometry(q_len, kv_len, bq, bk, causal)
    nkv = valid.shape[1]
    keep = op.And(keep, const(valid))
    part = op.And(keep, const(partial))
    full = op.And(keep, const(valid & ~partial))
    return (*_compress(part, widths[0], nkv), *_compress(full, widths[1], nkv))


def _scatter_true(like, indices, take):
    """bool like `like`'s shape: True at `indices` (last axis) where `take`."""
    zeros = op.ConstantOfShape(op.Shape(like), value=ir.tensor(np.array([False])))
    return op.ScatterElements(zeros, indices, take, axis=-1)


def select_blocks_onnx(scores, q_len: int, kv_len: int, causal: bool, block_q: int,
                       block_kv: int, topk: int, threshold: float, sink: int, window: int):
    valid, _ = _geometry(q_len, kv_len, block_q, block_kv, causal)
    forced = _forced(q_len, kv_len, block_q, block_kv, causal, sink, window) & valid
    nkv = valid.shape[1]
    budget = min(topk if topk > 0 else nkv, nkv)
    s = cast_to(scores, ir.DataType.FLOAT)
    ranked = op.Where(const(valid & ~forced), s, const(NEG_INF, np.float32))
    vals, idx = op.TopK(ranked, ints(nkv), axis=-1, largest=1, sorted=1)
    take = op.And(op.Less(const(np.arange(nkv), np.int64), const(budget, np.int64)),
                  op.Greater(vals, const(NEG_INF, np.float32)))
    if threshold > 0:
        mass = op.ReduceSum(op.Where(const(forced), s, const(0.0, np.float32)), ints(-1),
                            keepdims=1)
        p = op.Max(vals, const(0.0, np.float32))
        before = op.Sub(op.CumSum(p, const(-1, np.int64)), p)
        take = op.And(take, op.Less(op.Add(mass, before), const(threshold, np.float32)))
    chosen = _scatter_true(ranked, idx, take)
    keep = op.Or(chosen, const(forced))
    widths = selection_widths(q_len, kv_len, block_q, block_kv, causal, topk, threshold, sink,
                              window)
    return _to_layout(keep, q_len, kv_len, block_q, block_kv, causal, widths)


# vertical-slash --------------------------------------------------------------------------------
def _top_mask(score, count: int, n: int, dt):
    """bool: the `count` highest entries of the last axis (never a −inf one)."""
    count = min(max(count, 0), n)
    if count == 0:
        return op.ConstantOfShape(op.Shape(score), value=ir.tensor(np.array([False])))
    vals, idx = op.TopK(score, ints(count), axis=-1, largest=1, sorted=1)
    return _scatter_true(score, idx, op.Greater(vals, const(NEG_INF, dt)))


def _diagonal_sums(probs, rows: int, cols: int, first_row: int):
    """[B, H, rows + first_row + cols − 1]: Σ over rows t of probs[t − first_row, s] with
    t − s + cols − 1 = offset (the reference's scatter_add over offsets), by skewing: with
    the columns reversed, row r shifted right by r puts a diagonal in one column."""
    rev = op.Slice(probs, ints(-1), ints(-(2 ** 62)), ints(3), ints(-1))
    padded = op.Pad(rev, ints(0, 0, 0, 0, 0, 0, 0, rows))                # [B, H, R, C + R]
    flat = op.Reshape(padded, ints(0, 0, -1))
    width = cols + rows - 1
    skew = op.Reshape(op.Slice(flat, ints(0), ints(rows * width), ints(2)),
                      ints(0, 0, rows, width))
    sums = op.ReduceSum(skew, ints(2), keepdims=0)                        # [B, H, C + R − 1]
    return op.Pad(sums, ints(0, 0, first_row, 0, 0, 0)) if first_row else sums


def select_vertical_slash_onnx(q, k, scale: float, causal: bool, block: int, vertical: int,
                               slash: int, sink: int, window: int):
    qd, kd = static_dims(q), static_dims(k)
    hq, L, hkv, S = qd[1], qd[2], kd[1], kd[2]
    work = work_type(q.dtype)
    dt = np_type(work)
    nq, nkv = math.ceil(L / block), math.ceil(S / block)
    first = (nq - 1) * block
    rows = np.arange(first, L)
    qr = op.Slice(cast_to(q, work), ints(first), ints(L), ints(2))
    logits = _grouped_logits(qr, cast_to(k, work), hq, hkv, len(rows), S, scale, work)
    if causal:
        seen = np.arange(S)[None, :] <= rows[:, None]
        logits = op.Where(const(seen), logits, const(NEG_INF, dt))
    probs = op.Softmax(logits, axis=-1)                                   # [B, H, r, S]
    column_score = op.ReduceSum(probs, ints(2), keepdims=0)
    slash_score = _diagonal_sums(probs, len(rows), S, first)              # [B, H, L + S − 1]
    if causal:
        visible = np.arange(L + S - 1) >= S - 1  # negative offsets t − s are never visible
        slash_score = op.Where(const(visible), slash_score, const(NEG_INF, dt))
    v_sel = _top_mask(column_score, vertical, S, dt)
    s_sel = _top_mask(slash_score, slash, L + S - 1, dt)
    # vertical: the key block holds a chosen column
    v_pad = op.Pad(op.Cast(v_sel, to=ir.DataType.UINT8), ints(0, 0, 0, 0, 0, nkv * block - S)) \
        if nkv * block != S else op.Cast(v_sel, to=ir.DataType.UINT8)
    v_blocks = op.ReduceMax(op.Reshape(v_pad, ints(0, 0, nkv, block)), ints(-1), keepdims=0)
    keep = op.Unsqueeze(op.Cast(v_blocks, to=ir.DataType.BOOL), ints(2))  # [B, H, 1, NKV]
    # slash: an offset t − s in the block's range was chosen (prefix sums over offsets)
    with host_tensors():
        q0, q1, k0, k1 = (_np(t) for t in block_ranges(L, S, block, block, "cpu"))
    n_off = L + S - 1
    lo = np.clip(q0 - k1 + (S - 1), 0, n_off)
    hi = np.clip(q1 - k0 + (S - 1) + 1, 0, n_off)
    csum = op.CumSum(op.Pad(op.Cast(s_sel, to=ir.DataType.INT64), ints(0, 0, 1, 0, 0, 0)),
                     const(-1, np.int64))
    hits = op.Sub(op.Gather(csum, const(hi, np.int64), axis=2),
                  op.Gather(csum, const(np.broadcast_to(lo, hi.shape).copy(), np.int64),
                            axis=2))
    keep = op.Or(keep, op.Greater(hits, const(0, np.int64)))
    keep = op.Or(keep, const(_forced(L, S, block, block, causal, sink, window)))
    widths = vertical_slash_widths(L, S, block, causal, vertical, slash, sink, window)
    return _to_layout(keep, L, S, block, block, causal, widths)

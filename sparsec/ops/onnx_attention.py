"""ONNX translations of `sparsec::block_sparse_attention` (see docs/onnx.md).

Three forms, all with the op's semantics (`sparsec.ops.attention_reference`):

- **gathered** (default): per query block, Gather the kept key/value blocks (a fixed width of
  KP + KF slots, the layout's two lists side by side), then batched MatMul → bias (padding
  slots, ragged tails, the causal diagonal, the element mask) → Softmax → MatMul. Only kept
  blocks are computed, on any execution provider. Layout tensors may be initializers (static
  layouts: the index arithmetic folds to constants) or computed in the graph (dynamic layouts).
- **dense**: the whole [L, S] score matrix under the layout's element mask (the fallback).
- **contrib**: `com.microsoft.SparseAttention` (onnxruntime's Phi-3-small kernel), only for
  causal self-attention with a static layout, no element mask and no soft-cap; its CUDA
  kernel also needs float16/bfloat16, head size 128 and blocks of 64.

A soft-cap (Gemma 2) is Div → Tanh → Mul on the scaled scores, before the mask, in the
gathered and dense forms.

Grouped-query attention reads each key/value head once: tensors are kept as
[B, Hkv, G, NQ, bq, ·] (G query heads per key/value head); a layout without a head dimension
gathers one set of blocks per key/value head and broadcasts it over the G query heads. A query
row that sees no key outputs 0 and has logsumexp −inf (Softmax would give NaN: a Where on the
output replaces those rows). The logsumexp output is computed only if the graph uses it (the
exporter drops dead nodes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .onnx_common import (
    NEG_INF,
    batch_range,
    cast_to,
    const,
    current_context,
    ints,
    ir,
    np_type,
    op,
    static_dims,
    work_type,
)

__all__ = ["translate_attention", "gathered_attention", "dense_attention",
           "contrib_attention", "contrib_refusal", "Geometry"]

CONTRIB_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class Geometry:
    """Static sizes of one attention site (batch may be symbolic: never read here)."""

    hq: int
    hkv: int
    length: int         # L, queries
    kv_length: int      # S, keys
    d: int
    dv: int
    bq: int
    bk: int
    nq: int
    nkv: int
    kp: int             # partial slots
    kf: int             # full slots
    layout_heads: int   # 1 or hq
    layout_batched: bool
    causal: bool
    scale: float
    softcap: float = 0.0

    @property
    def g(self) -> int:
        return self.hq // self.hkv

    @property
    def w(self) -> int:
        return self.kp + self.kf

    @property
    def p(self) -> int:
        return self.w * self.bk

    @property
    def gx(self) -> int:  # query heads per key/value head that need their own gathered blocks
        return 1 if self.layout_heads == 1 else self.g

    @property
    def hk(self) -> int:  # the layout's key/value-head dim once grouped
        return 1 if self.layout_heads == 1 else self.hkv


def geometry(q, k, v, num, idx, fidx, scale: float, causal: bool, bq: int, bk: int,
             softcap: float = 0.0) -> Geometry:
    qd, kd, vd, nd = static_dims(q), static_dims(k), static_dims(v), static_dims(num)
    hq, length, d = qd[1], qd[2], qd[3]
    hkv, kv_length = kd[1], kd[2]
    for name, x in (("heads", hq), ("length", length), ("head dim", d), ("kv heads", hkv),
                    ("kv length", kv_length), ("v dim", vd[3])):
        if not isinstance(x, int):
            raise ValueError(f"block_sparse_attention export needs a static {name}")
    layout_heads = nd[1]
    if layout_heads not in (1, hq):
        raise ValueError(f"layout has {layout_heads} heads; expected 1 or {hq}")
    return Geometry(hq=hq, hkv=hkv, length=length, kv_length=kv_length, d=d, dv=vd[3], bq=bq,
                    bk=bk, nq=math.ceil(length / bq), nkv=math.ceil(kv_length / bk),
                    kp=static_dims(idx)[3], kf=static_dims(fidx)[3], layout_heads=layout_heads,
                    layout_batched=nd[0] != 1, causal=bool(causal), scale=float(scale),
                    softcap=float(softcap))


# the translation registered for the op ---------------------------------------------------------
def translate_attention(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                        attn_mask, scale: float, causal: bool, block_q: int, block_kv: int,
                        softcap: float = 0.0):
    """Pick the form (backend options in `current_context()`), record it, and build it."""
    geo = geometry(q, k, v, kv_num_blocks, kv_indices, full_kv_indices, scale, causal, block_q,
                   block_kv, softcap)
    ctx = current_context()
    never_empty = ctx.hint(len(ctx.sites)).get("rows_never_empty", False)
    form, reason = _choose(ctx, geo, q.dtype, attn_mask is not None)
    ctx.sites.append({"form": form, **({"note": reason} if reason else {}),
                      "q_len": geo.length, "kv_len": geo.kv_length, "block": [geo.bq, geo.bk],
                      "slots": geo.w, "kv_blocks": geo.nkv})
    args = (q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, attn_mask,
            geo, never_empty)
    if form == "dense":
        return dense_attention(*args)
    if form == "contrib":
        out = contrib_attention(*args[:-1])
        return out, gathered_attention(*args)[1]  # lse only if used (dead code otherwise)
    return gathered_attention(*args)


def _choose(ctx, geo: Geometry, dtype, masked: bool) -> tuple[str, str | None]:
    if ctx.attention in ("gathered", "dense"):
        return ctx.attention, None
    want_contrib = ctx.attention == "contrib" or ctx.provider == "cuda"
    if not want_contrib:
        return "gathered", None
    refusal = contrib_refusal(geo, dtype, masked, kernel=ctx.attention != "contrib")
    if refusal is None:
        return "contrib", None
    return "gathered", f"com.microsoft.SparseAttention not used: {refusal}"


def contrib_refusal(geo: Geometry, dtype, masked: bool, kernel: bool = True) -> str | None:
    """Why `com.microsoft.SparseAttention` cannot compute this site (None: it can). `kernel`
    adds the limits of onnxruntime's CUDA kernel to those of the op itself."""
    if geo.softcap:
        return "the site soft-caps its scores (tanh, Gemma 2); the op has no soft-cap"
    if not geo.causal:
        return "the op computes causal (unidirectional) attention only"
    if masked:
        return "the site has an element mask (padding); the op takes none"
    if geo.layout_batched:
        return "the layout differs per batch element (dynamic selection); the op takes one " \
               "layout per head"
    if geo.length != geo.kv_length:
        return f"query and key lengths differ ({geo.length} vs {geo.kv_length})"
    if geo.bq != geo.bk:
        return f"query and key blocks differ ({geo.bq} vs {geo.bk})"
    if geo.d != geo.dv or geo.d % 8:
        return f"head sizes (q/k {geo.d}, v {geo.dv}) must be equal and a multiple of 8"
    if not kernel:
        return None
    if dtype not in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
        return f"the CUDA kernel takes float16/bfloat16, the model is {dtype.name.lower()}"
    if geo.d != 128 or geo.bq != 64:
        return f"the CUDA kernel takes head size 128 and blocks of 64 (here {geo.d} and {geo.bq})"
    return None


# layout slots --------------------------------------------------------------------------------
def _slots(num, idx, fnum, fidx, geo: Geometry):
    """(ids int64, live bool), both [Bl, Hk, Gx, NQ, W]: the key block in each slot, and
    whether the slot is used (padding past a row's count is not)."""
    ids, live = [], []
    for n, i, width in ((num, idx, geo.kp), (fnum, fidx, geo.kf)):
        if width == 0:
            continue
        ids.append(op.Cast(i, to=ir.DataType.INT64))
        slot = const(np.arange(width), np.int64)
        live.append(op.Less(slot, op.Unsqueeze(op.Cast(n, to=ir.DataType.INT64), ints(-1))))
    ids = ids[0] if len(ids) == 1 else op.Concat(*ids, axis=-1)
    live = live[0] if len(live) == 1 else op.Concat(*live, axis=-1)
    shape = ints(0, geo.hk, geo.gx, geo.nq, geo.w)  # 0: keep the layout's batch dim
    return op.Reshape(ids, shape), op.Reshape(live, shape)


def _pad_rows(x, rows: int, target: int):
    """x [..., rows, D] zero-padded to `target` rows (dim -2)."""
    if target == rows:
        return x
    return op.Pad(x, ints(0, 0, 0, 0, 0, 0, target - rows, 0))


def _gather_blocks(x, ids, geo: Geometry, dim: int):
    """x [B, Hkv, S, dim] → the slots' key blocks [B, Hkv, Gx, NQ, P, dim]."""
    x = _pad_rows(x, geo.kv_length, geo.nkv * geo.bk)
    if not geo.layout_batched and geo.layout_heads == 1:  # one index table for every (b, h)
        blocks = op.Reshape(x, ints(0, 0, geo.nkv, geo.bk, dim))
        picked = op.Gather(blocks, op.Reshape(ids, ints(geo.nq, geo.w)), axis=2)
        return op.Reshape(picked, ints(0, 0, 1, geo.nq, geo.p, dim))
    # per (batch, head) indices: gather rows of the flattened [B·Hkv·NKV, bk, dim] table
    table = op.Reshape(x, ints(-1, geo.bk, dim))
    heads = const((np.arange(geo.hkv) * geo.nkv).reshape(1, geo.hkv, 1, 1, 1), np.int64)
    flat = op.Add(op.Add(ids, batch_range(x, geo.hkv * geo.nkv, 5)), heads)
    picked = op.Gather(table, flat, axis=0)
    return op.Reshape(picked, ints(0, 0, 0, 0, geo.p, dim))


def _positions(ids, live, geo: Geometry):
    """(pos int64, ok bool), [Bl, Hk, Gx, NQ, P]: the key position of every gathered column and
    whether it is a used slot inside the sequence."""
    offsets = const(np.arange(geo.bk), np.int64)
    pos = op.Add(op.Unsqueeze(op.Mul(ids, const(geo.bk, np.int64)), ints(-1)), offsets)
    pos = op.Reshape(pos, ints(0, 0, 0, 0, geo.p))
    used = op.Expand(op.Unsqueeze(live, ints(-1)), ints(1, 1, 1, 1, 1, geo.bk))
    ok = op.Reshape(used, ints(0, 0, 0, 0, geo.p))
    if geo.kv_length % geo.bk:
        ok = op.And(ok, op.Less(pos, const(geo.kv_length, np.int64)))
    return pos, ok


def _query_rows(geo: Geometry) -> np.ndarray:
    """int64 [NQ, bq]: the query position of each padded row."""
    return np.arange(geo.nq)[:, None] * geo.bq + np.arange(geo.bq)[None, :]


# element masks -------------------------------------------------------------------------------
def _mask_dims(mask) -> list[Any]:
    dims = static_dims(mask)
    return [1] * (4 - len(dims)) + dims


def _as_4d(mask):
    rank = len(static_dims(mask))
    return mask if rank == 4 else op.Unsqueeze(mask, ints(*range(4 - rank)))


def _gather_mask(mask, pos, q, geo: Geometry):
    """The element mask at (query row, gathered key column): rank 6, broadcastable to
    [B, Hkv, G, NQ, bq, P], without materializing the broadcast mask."""
    mb, mh, ml, ms = _mask_dims(mask)
    flat = op.Reshape(_as_4d(mask), ints(-1))
    s_stride = 1 if ms != 1 else 0
    l_stride = ms if ml != 1 else 0
    h_stride = ml * ms if mh != 1 else 0
    terms = []
    if mb != 1:
        terms.append(batch_range(q, mh * ml * ms, 6))
    if h_stride:
        head = np.arange(geo.hkv)[:, None] * geo.g + np.arange(geo.g)[None, :]
        terms.append(const((head * h_stride).reshape(1, geo.hkv, geo.g, 1, 1, 1), np.int64))
    if l_stride:
        rows = np.minimum(_query_rows(geo), geo.length - 1)
        terms.append(const((rows * l_stride).reshape(1, 1, 1, geo.nq, geo.bq, 1), np.int64))
    if s_stride:
        clipped = op.Min(pos, const(geo.kv_length - 1, np.int64))
        terms.append(op.Unsqueeze(clipped, ints(4)))
    index = terms[0] if terms else const(np.zeros((1, 1, 1, 1, 1, 1)), np.int64)
    for t in terms[1:]:
        index = op.Add(index, t)
    return op.Gather(flat, index, axis=0)


def _bias(allowed, mask_values, work):
    """0 (or the float mask) where allowed, −inf elsewhere."""
    dt = np_type(work)
    fill = const(0.0, dt) if mask_values is None else mask_values
    return op.Where(allowed, fill, const(NEG_INF, dt))


def _split_mask(allowed, mask, gathered, work):
    """Fold the element mask into `allowed` (bool) or return it as float values to add."""
    if mask is None:
        return allowed, None
    if mask.dtype == ir.DataType.BOOL:
        return op.And(allowed, gathered), None
    return allowed, cast_to(gathered, work)


# softmax and the empty-row rule --------------------------------------------------------------
def _scaled_scores(q, kt, geo: Geometry, work):
    """(q @ kᵀ) · scale, as the reference computes it (onnxruntime folds the scale and the
    transpose into one FusedMatMul), then softcap · tanh(· / softcap) if the site caps."""
    scores = op.Mul(op.MatMul(q, kt), const(geo.scale, np_type(work)))
    if not geo.softcap:
        return scores
    cap = const(geo.softcap, np_type(work))
    return op.Mul(op.Tanh(op.Div(scores, cap)), cap)


def _attend(scores, bias, values, work, never_empty: bool = False):
    """(out, lse) of softmax(scores + bias) @ values; rows whose bias is all −inf are 0 / −inf
    (`never_empty`: the backend proved there are none, so no Where is needed)."""
    scores = op.Add(scores, bias)
    probs = op.Softmax(scores, axis=-1)
    out = op.MatMul(probs, values)
    lse = op.ReduceLogSumExp(scores, ints(-1), keepdims=0)
    if never_empty:
        return out, lse
    seen = op.Not(op.Equal(op.ReduceMax(bias, ints(-1), keepdims=1),
                           const(NEG_INF, np_type(work))))
    out = op.Where(seen, out, const(0.0, np_type(work)))
    lse = op.Where(op.Squeeze(seen, ints(-1)), lse, const(NEG_INF, np_type(work)))
    return out, lse


def _finish(out, lse, q, geo: Geometry, rows: int):
    """[B, Hkv, G, ..., Dv] → out [B, Hq, L, Dv] in q's dtype, lse [B, Hq, L]."""
    out = op.Reshape(out, ints(0, geo.hq, rows, geo.dv))
    lse = op.Reshape(lse, ints(0, geo.hq, rows))
    if rows != geo.length:
        out = op.Slice(out, ints(0), ints(geo.length), ints(2))
        lse = op.Slice(lse, ints(0), ints(geo.length), ints(2))
    return cast_to(out, q.dtype), lse


def _empty(q, geo: Geometry):
    """No slot at all: every row sees nothing."""
    work = work_type(q.dtype)
    shape = op.Concat(op.Shape(q, start=0, end=1), ints(geo.hq, geo.length, geo.dv), axis=0)
    out = cast_to(op.ConstantOfShape(shape), q.dtype)  # float32 zeros, then q's dtype
    lse_shape = op.Concat(op.Shape(q, start=0, end=1), ints(geo.hq, geo.length), axis=0)
    lse = op.Expand(const(NEG_INF, np_type(work)), lse_shape)
    return out, lse


# the forms -----------------------------------------------------------------------------------
def gathered_attention(q, k, v, num, idx, fnum, fidx, mask, geo: Geometry,
                       never_empty: bool = False):
    """Only the kept blocks: [B, Hkv, G, NQ, bq, P] scores."""
    if geo.w == 0:
        return _empty(q, geo)
    work = work_type(q.dtype)
    ids, live = _slots(num, idx, fnum, fidx, geo)
    kg = _gather_blocks(cast_to(k, work), ids, geo, geo.d)
    vg = _gather_blocks(cast_to(v, work), ids, geo, geo.dv)
    qs = _pad_rows(cast_to(q, work), geo.length, geo.nq * geo.bq)
    qs = op.Reshape(qs, ints(0, geo.hkv, geo.g, geo.nq, geo.bq, geo.d))
    scores = _scaled_scores(qs, op.Transpose(kg, perm=[0, 1, 2, 3, 5, 4]), geo, work)
    pos, ok = _positions(ids, live, geo)
    allowed = op.Unsqueeze(ok, ints(4))                               # [.., NQ, 1, P]
    if geo.causal:
        rows = const(_query_rows(geo)[:, :, None], np.int64)          # [NQ, bq, 1]
        allowed = op.And(allowed, op.LessOrEqual(op.Unsqueeze(pos, ints(4)), rows))
    gathered = _gather_mask(mask, pos, q, geo) if mask is not None else None
    allowed, values = _split_mask(allowed, mask, gathered, work)
    out, lse = _attend(scores, _bias(allowed, values, work), vg, work, never_empty)
    return _finish(out, lse, q, geo, geo.nq * geo.bq)


def _dense_blocks(ids, live, geo: Geometry):
    """bool [Bl, Hk, Gx, NQ, NKV]: which blocks the layout keeps."""
    hit = op.Equal(op.Unsqueeze(ids, ints(-1)), const(np.arange(geo.nkv), np.int64))
    hit = op.And(hit, op.Unsqueeze(live, ints(-1)))
    kept = op.ReduceMax(op.Cast(hit, to=ir.DataType.UINT8), ints(-2), keepdims=0)
    return op.Cast(kept, to=ir.DataType.BOOL)


def dense_attention(q, k, v, num, idx, fnum, fidx, mask, geo: Geometry,
                    never_empty: bool = False):
    """The whole [L, S] score matrix under the layout's element mask (computes dropped
    blocks too: the explicit fallback)."""
    work = work_type(q.dtype)
    L, S = geo.length, geo.kv_length
    if geo.w == 0:
        return _empty(q, geo)
    ids, live = _slots(num, idx, fnum, fidx, geo)
    blocks = _dense_blocks(ids, live, geo)
    allowed = op.Gather(blocks, const(np.arange(L) // geo.bq, np.int64), axis=3)
    allowed = op.Gather(allowed, const(np.arange(S) // geo.bk, np.int64), axis=4)
    if geo.causal:
        allowed = op.And(allowed, const(np.tril(np.ones((L, S), bool))))
    values = None
    if mask is not None:
        _, mh, ml, ms = _mask_dims(mask)
        m = _as_4d(mask)
        m = op.Reshape(m, ints(0, geo.hkv, geo.g, ml, ms)) if mh != 1 else \
            op.Unsqueeze(m, ints(2))
        allowed, values = _split_mask(allowed, mask, m, work)
    qs = op.Reshape(cast_to(q, work), ints(0, geo.hkv, geo.g, L, geo.d))
    k5 = op.Unsqueeze(cast_to(k, work), ints(2))
    v5 = op.Unsqueeze(cast_to(v, work), ints(2))
    scores = _scaled_scores(qs, op.Transpose(k5, perm=[0, 1, 2, 4, 3]), geo, work)
    out, lse = _attend(scores, _bias(allowed, values, work), v5, work, never_empty)
    return _finish(out, lse, q, geo, L)


def _sparse_attention_op():
    """onnxruntime's `com.microsoft.SparseAttention` (v1) as an onnxscript op. onnx has no
    schema for contrib ops, so this one is written from onnxruntime's (same inputs,
    outputs, attributes and types)."""
    import onnx
    from onnxscript import values as osv

    S = onnx.defs.OpSchema
    opt, single = S.FormalParameterOption.Optional, S.FormalParameterOption.Single

    def param(name, type_str, option=single):
        return S.FormalParameter(name, type_str, "", param_option=option)

    inputs = [param("query", "T"), param("key", "T", opt), param("value", "T", opt),
              param("past_key", "T"), param("past_value", "T"), param("block_row_indices", "M"),
              param("block_col_indices", "M"), param("total_sequence_length", "M"),
              param("key_total_sequence_lengths", "M"), param("cos_cache", "T", opt),
              param("sin_cache", "T", opt)]
    outputs = [param("output", "T"), param("present_key", "T"), param("present_value", "T")]
    types = [("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
             ("M", ["tensor(int32)"], "")]
    A = S.AttrType
    attributes = [S.Attribute("num_heads", A.INT, "", required=True),
                  S.Attribute("kv_num_heads", A.INT, "", required=True),
                  S.Attribute("sparse_block_size", A.INT, "", required=True),
                  S.Attribute("scale", A.FLOAT, "", required=False),
                  S.Attribute("do_rotary", A.INT, "", required=False),
                  S.Attribute("rotary_interleaved", A.INT, "", required=False)]
    schema = S("SparseAttention", CONTRIB_DOMAIN, 1, "", inputs=inputs, outputs=outputs,
               type_constraints=types, attributes=attributes)
    return osv.Op(osv.Opset(CONTRIB_DOMAIN, 1), "SparseAttention", schema)


def contrib_attention(q, k, v, num, idx, fnum, fidx, mask, geo: Geometry):
    """`com.microsoft.SparseAttention` on the layout as CSR (one layout per head, cycled)."""
    i32 = ir.DataType.INT32
    ids, live = _slots(num, idx, fnum, fidx, geo)
    blocks = op.Reshape(_dense_blocks(ids, live, geo), ints(geo.layout_heads, geo.nq, geo.nkv))
    counts = op.ReduceSum(op.Cast(blocks, to=ir.DataType.INT64), ints(-1), keepdims=0)
    zero = const(np.zeros((geo.layout_heads, 1)), np.int64)
    rows = op.Concat(zero, op.CumSum(counts, const(1, np.int64)), axis=1)
    # columns in row-major order, compacted: sort the kept (row, col) keys, pad with −1
    big = geo.nq * geo.nkv
    keys = op.Where(blocks, const(np.arange(big).reshape(geo.nq, geo.nkv), np.int64),
                    const(big, np.int64))
    keys = op.Reshape(keys, ints(geo.layout_heads, big))
    nnz = op.Reshape(op.ReduceMax(op.ReduceSum(counts, ints(-1), keepdims=0), ints(0),
                                  keepdims=1), ints(1))
    top, _ = op.TopK(keys, nnz, axis=-1, largest=0, sorted=1)
    cols = op.Where(op.Less(top, const(big, np.int64)), op.Mod(top, const(geo.nkv, np.int64)),
                    const(-1, np.int64))
    batch = op.Shape(q, start=0, end=1)
    cache = op.ConstantOfShape(op.Concat(batch, ints(geo.hkv, geo.nq * geo.bq, geo.d), axis=0),
                               value=ir.tensor(np.zeros(1, np.float32)))
    cache = cast_to(cache, q.dtype)
    cache_v = op.Identity(cache)
    total = const(np.array([geo.length]), np.int32)
    key_lengths = op.Expand(total, batch)
    flat_q = op.Reshape(op.Transpose(q, perm=[0, 2, 1, 3]), ints(0, 0, geo.hq * geo.d))
    flat_k = op.Reshape(op.Transpose(k, perm=[0, 2, 1, 3]), ints(0, 0, geo.hkv * geo.d))
    flat_v = op.Reshape(op.Transpose(v, perm=[0, 2, 1, 3]), ints(0, 0, geo.hkv * geo.d))
    out, _, _ = _sparse_attention_op()(
        flat_q, flat_k, flat_v, cache, cache_v, op.Cast(rows, to=i32), op.Cast(cols, to=i32),
        total, key_lengths, num_heads=geo.hq, kv_num_heads=geo.hkv,
        sparse_block_size=geo.bq, scale=geo.scale)
    out = op.Reshape(out, ints(0, 0, geo.hq, geo.d))
    return op.Transpose(out, perm=[0, 2, 1, 3])

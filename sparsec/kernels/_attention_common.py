"""Shared pieces of the block-sparse attention kernels: argument preparation (layout and mask
strides with broadcasting), the transposed layout the dK/dV kernel walks, tile choices, and the
@triton.jit helpers both directions use."""

import weakref
from typing import Any

import torch

from . import _triton
from ._launch import launch
from ._triton import HAS_TRITON, interpreting, next_pow2, no_sync_allowed, tl, triton

__all__ = ["empty", "kernel_supports", "layout_args", "mask_args", "transposed_layout",
           "head_block", "load_rows", "mma", "query_tile", "key_subtile", "tanh", "capped_scores",
           "score_args", "LOG2E", "LN2", "bias_base2",
           "PlanCache", "plan_key", "launch_cached", "direct_enabled", "launch_device"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every kernel output is allocated here, so a test can poison them (fill with NaN) and
    check that the kernels write every element."""
    return torch.empty(*shape, dtype=dtype, device=device)


def kernel_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int,
                    block_kv: int) -> str | None:
    """None if the Triton kernels take these inputs, else why not (the launcher then runs the
    reference path)."""
    if not HAS_TRITON:
        return "triton is not installed"
    if _triton.FORCE_REFERENCE:
        return "kernels switched off (references_only)"
    if not (q.is_cuda or interpreting()):
        return "tensors are not on a CUDA device"
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype} (kernels take float16, bfloat16 and float32)"
    if block_q not in (16, 32, 64, 128) or block_kv not in (16, 32, 64, 128):
        return f"blocks ({block_q}, {block_kv}) (kernels take 16, 32, 64, 128)"
    if max(q.shape[-1], v.shape[-1]) > 256:
        return f"head dim {max(q.shape[-1], v.shape[-1])} > 256"
    return None


def head_block(d: int) -> int:
    """The power-of-two tile width covering a head dim (masked when d is not a power of 2)."""
    return max(16, next_pow2(d))


def layout_args(num: torch.Tensor, idx: torch.Tensor, batch: int, heads: int
                ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """(num, idx, 7 strides) with batch/head dims broadcast to (batch, heads) by stride 0.

    An empty list (width 0) gets a one-slot dummy: its counts are 0, so it is never read,
    but a kernel argument must point somewhere."""
    num = num.to(torch.int32).expand(batch, heads, num.shape[-1])
    if idx.shape[-1] == 0:
        idx = torch.zeros(1, 1, idx.shape[2], 1, dtype=torch.int32, device=idx.device)
    idx = idx.to(torch.int32).expand(batch, heads, *idx.shape[2:])
    return num, idx, (*num.stride(), *idx.stride())


def mask_args(attn_mask: torch.Tensor | None, batch: int, heads: int, q_len: int,
              kv_len: int, like: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], int]:
    """(mask tensor, 4 strides, kind): kind 0 none, 1 bool (as uint8), 2 float (added)."""
    if attn_mask is None:
        return like, (0, 0, 0, 0), 0
    m = attn_mask
    while m.dim() < 4:
        m = m[None]
    m = m.expand(batch, heads, q_len, kv_len)
    if m.dtype == torch.bool:
        return m.view(torch.uint8), m.stride(), 1
    return m, m.stride(), 2


# transposed layout ------------------------------------------------------------------------
_TRANSPOSED = _triton.TensorCache(32)


def _transpose_list(num: torch.Tensor, idx: torch.Tensor, nkv: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of one block list, by key block: (row_ptr int32 [Bl*Hl*NKV + 1], query blocks
    int32 [capacity]) with row (bl*Hl + hl)*NKV + j listing, ascending, the query blocks whose
    list holds key block j. All on the device: the capacity is the list's slot count, so no
    count has to be read on the host."""
    bl, hl, nq, width = idx.shape
    dev = idx.device
    rows = bl * hl * nkv
    if width == 0:
        return (torch.zeros(rows + 1, dtype=torch.int32, device=dev),
                torch.zeros(1, dtype=torch.int32, device=dev))
    live = torch.arange(width, device=dev) < num.long()[..., None]
    bh = torch.arange(bl * hl, device=dev).view(bl, hl, 1, 1)
    key = torch.where(live, bh * nkv + idx.long(), rows).flatten()
    qblock = torch.arange(nq, device=dev).view(1, 1, nq, 1).expand(bl, hl, nq, width).flatten()
    # stable: entries of one key block keep their (ascending) query-block order
    _, perm = torch.sort(key, stable=True)
    counts = torch.zeros(rows + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, key, torch.ones_like(key))
    row_ptr = torch.zeros(rows + 1, dtype=torch.int64, device=dev)
    row_ptr[1:] = torch.cumsum(counts[:-1], 0)
    return row_ptr.to(torch.int32), qblock[perm].to(torch.int32)


def transposed_layout(num: torch.Tensor, idx: torch.Tensor, fnum: torch.Tensor,
                      fidx: torch.Tensor, nkv: int) -> tuple[torch.Tensor, ...]:
    """(partial row_ptr, partial q blocks, full row_ptr, full q blocks), cached per layout:
    a layout reused across steps (static layouts) is transposed once. The cache holds weak
    references and the tensors' version counters, so a new or modified layout never hits."""
    return _TRANSPOSED.get(
        (num, idx, fnum, fidx), (nkv,),
        lambda: (*_transpose_list(num, idx, nkv), *_transpose_list(fnum, fidx, nkv)))


def score_args(scale: float, softcap: float) -> tuple[float, float]:
    """(qk_scale, cap2) for the kernels: without a cap, scores are q·k · scale · log2(e) (base
    2); with one, tanh(q·k · scale / softcap) · softcap · log2(e)."""
    if softcap:
        return float(scale) / float(softcap), float(softcap) * LOG2E
    return float(scale) * LOG2E, 0.0


# plans -------------------------------------------------------------------------------------
def direct_enabled() -> bool:
    """Direct launches are on (SETTINGS.launch) and the kernels are not switched off."""
    return _triton.SETTINGS.launch == "direct" and not _triton.FORCE_REFERENCE and \
        not interpreting()


def launch_device(t: torch.Tensor) -> int | None:
    """The CUDA device index on which launches for `t` may go direct, or None: CPU tensors,
    or `t` not on the current device (Triton compiles and launches for the current one)."""
    if not t.is_cuda or not direct_enabled():
        return None
    index = t.device.index
    return index if torch._C._cuda_getDevice() == index else None


def plan_key(kind: str, tensors, layout, mask, extra) -> tuple:
    """Everything a launch's specialization and its stored arguments depend on: shapes,
    strides, dtypes and 16-byte alignment of the per-call tensors, the device, the layout
    tensors' identities and version counters, the mask's metadata, and `extra` (scalars)."""
    key = [kind, tensors[0].device.index, extra]
    for t in tensors:
        key += (t.shape, t.stride(), t.dtype, t.data_ptr() % 16 == 0)
    key += (id(t) for t in layout)
    key += (t._version for t in layout)
    if mask is not None:
        key += (mask.shape, mask.stride(), mask.dtype, mask.data_ptr() % 16 == 0)
    return tuple(key)


def launch_cached(cache: "PlanCache", key: tuple | None, layout, launches, tensors: dict,
                  device_index: int | None, tag: Any = None) -> None:
    """Run `launches`; with a `key` (and no stream capture, which would pin its tile) record
    their direct launches and store them, with `tag`, for `cache.get(key, layout)` to return
    as (tag, recorded) — only if every launch could be made direct."""
    record = key is not None and not no_sync_allowed()
    recorded = launch(launches, tensors, device_index, record)
    if record and all(direct is not None for direct, _ in recorded):
        cache.put(key, layout, (tag, recorded))


class PlanCache:
    """Launch plans by `plan_key`, at most `size` of them (oldest dropped first). A plan
    holds weak references to the layout tensors it was built from: when one of them dies
    the plan is dropped (with the derived tensors it keeps alive), so per-step layouts of a
    dynamic selector do not pile up, and a reused id never hits a stale plan."""

    def __init__(self, size: int = 32):
        self.size = size
        self.plans: dict[tuple, tuple] = {}

    def get(self, key: tuple, layout):
        hit = self.plans.get(key)
        if hit is None:
            return None
        refs, plan = hit
        for r, t in zip(refs, layout):
            if r() is not t:
                return None
        return plan

    def put(self, key: tuple, layout, plan) -> None:
        plans = self.plans

        def drop(_ref, key=key):
            plans.pop(key, None)
        try:
            refs = tuple(weakref.ref(t, drop) for t in layout)
        except TypeError:  # pragma: no cover - tensors that refuse weak references
            return
        if len(self.plans) >= self.size:
            self.plans.pop(next(iter(self.plans)))
        self.plans[key] = (refs, plan)

    def clear(self) -> None:
        self.plans.clear()


# jit helpers ------------------------------------------------------------------------------
# Triton's interpreter multiplies bfloat16 tiles wrongly (seen with 3.6 and 3.9): under it,
# bf16 dot operands are widened to float32 first, which is exact (bf16 products fit in fp32).
_WIDEN_DOTS = tl.constexpr(interpreting()) if HAS_TRITON else False


@triton.jit
def mma(a, b, acc, FP32: tl.constexpr):
    """acc + a @ b with float32 accumulation: IEEE float32 for float32 inputs (no tf32), the
    tensor cores for float16/bfloat16."""
    if FP32:
        r = tl.dot(a, b, acc, input_precision="ieee")
    elif _WIDEN_DOTS:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        r = tl.dot(a, b, acc)
    return r


@triton.jit
def tanh(x):
    """tanh from one exp2 (Triton's interpreter has no libdevice): sign(x)·(1 − e)/(1 + e) with
    e = exp(−2|x|), which never overflows; absolute error ~1e-7."""
    e = tl.math.exp2(-2.8853900817779268 * tl.abs(x))  # 2·log2(e)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def bias_base2(mv):
    """A float mask entry in base-2 units, clamped at -2**126 where finite: HF's
    finfo(bfloat16).min times log2(e) would overflow float32 to -inf, and a row masked
    everywhere must attend uniformly (finite logits), as in the reference."""
    b = mv.to(tl.float32)
    return tl.where(b == float("-inf"), b, tl.maximum(b, -5.8965e37) * 1.4426950408889634)


@triton.jit
def capped_scores(s, qk_scale, cap2, SOFTCAP: tl.constexpr):
    """(base-2 scores, tanh or None) from the raw products: see `score_args`."""
    if SOFTCAP:
        t = tanh(s * qk_scale)
        s = t * cap2
    else:
        t = s
        s = s * qk_scale
    return s, t


@triton.jit
def query_tile(H, G, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr):
    """This program's query tile on a (query tiles, batch·query heads) grid, heaviest first
    (under a causal layout the last query blocks list the most keys): (batch·head, batch,
    query head, key/value head, first row, its layout block, the rows)."""
    tl.static_assert(BLOCK_Q % BLOCK_M == 0, "a query tile lies inside one layout block")
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    m0 = pid_m * BLOCK_M
    return bh, bh // H, h, h // G, m0, m0 // BLOCK_Q, m0 + tl.arange(0, BLOCK_M)


@triton.jit
def key_subtile(it, idx_ptr, idx_stride, S, m_last, BLOCK_KV: tl.constexpr,
                BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PARTIAL: tl.constexpr):
    """Step `it` of a query tile's walk over a key-block list in BLOCK_N-row sub-tiles: (first
    key row, whether it adds anything). Only partial lists test: a sub-tile past the end or
    entirely above the diagonal is skipped; full lists skip nothing, with no run-time test (a
    branch around their loads would keep the software pipeliner from overlapping them)."""
    tl.static_assert(BLOCK_KV % BLOCK_N == 0, "a key tile lies inside one layout block")
    SUBS: tl.constexpr = BLOCK_KV // BLOCK_N
    blk = tl.load(idx_ptr + (it // SUBS) * idx_stride)
    n0 = blk * BLOCK_KV + (it % SUBS) * BLOCK_N
    if PARTIAL:
        live = n0 < S
        if CAUSAL:
            live = live & (n0 <= m_last)
    else:
        live = True
    return n0, live


@triton.jit
def load_rows(ptr, rows, n_rows, cols, stride_r, stride_c, N_COLS: tl.constexpr,
              BLOCK_C: tl.constexpr, ROW_MASK: tl.constexpr):
    """A [len(rows), BLOCK_C] tile of a row-major-ish matrix, zero outside (rows < n_rows,
    cols < N_COLS); the masks are left out where the shapes make them always true."""
    ptrs = ptr + rows[:, None] * stride_r + cols[None, :] * stride_c
    if ROW_MASK:
        if BLOCK_C == N_COLS:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < N_COLS),
                        other=0.0)
    else:
        if BLOCK_C == N_COLS:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=cols[None, :] < N_COLS, other=0.0)
    return x

"""Sparse-delta products on Triton: the sampled dense–dense product for the delta's gradient.

`sparsec::sampled_grad(grad, x, indices, in_features)` is dW.flatten()[indices] for
dW = gradᵀ·x (grad [T, out], x [T, in]): only k of the out·in entries. Two ways to get them:

- **sampled**: every entry needs its column of x over all tokens, so x is copied transposed
  once (`_transpose_kernel`: each column becomes a contiguous row of xᵀ). Two forms of the
  products:
  - "block" (`_block_kernel`): the sorted indices are cut into chunks of E entries, one
    program each. A chunk spans few rows of W, so the program loads grad in
    [tokens × RW rows] windows (coalesced; the window starts on a multiple of 8 rows, so
    the loads are 16-byte asynchronous copies) and the chunk's E rows of xᵀ, accumulates
    x[:, E columns]ᵀ · grad[:, RW rows] in a float32 [E × RW] block on the tensor cores
    (both operands from shared memory: Hopper's wgmma where E ≥ 64), and after the token
    loop takes each entry's own element of the block. Any index order.
  - "window" (`_window_kernel`): one program per aligned window of RW rows of W holding all
    its entries (a range of the sorted indices: the transpose kernel's first programs find
    each window's start by binary search, `_row_bounds`, so it costs no launch of its own and
    is recomputed every call, inside CUDA graphs too): every element of grad is read once, in
    wide rows. Needs sorted indices.
  `choose_form` picks the window form for sorted indices (faster at every density measured)
  and `FORM_TILES` the tiles (tools/profile_sampled.py --sweep on the H100). Where there are
  fewer programs than SMs the token sum is cut into ranges (`token_splits`: about one
  program per SM) that run one after another along the grid's slow axis, so the xᵀ rows
  several programs share are re-read from L2 within a range; float32 partial sums are added
  by `_reduce_kernel`. grad and xᵀ are
  read about once each from memory: the cost grows with k·T, not out·in·T.
- **dense**: dW = gradᵀ·x through cuBLAS, then a gather.

The dense product costs 2·T·out·in FLOPs whatever k is; the sampled one moves ~(k + out)·T
elements. `choose_method` picks per call: the first call for a (shape, dtype, density bucket)
on CUDA times both on the real inputs and caches the choice (the measured crossover, used
automatically); under graph capture or without a GPU a cost model decides. The timing takes
7 interleaved runs of each with L2 flushed before each, and picks sampled only where it is
10% faster (`MARGIN`) by both the median and the fastest run: dense is the safe side, and
near the crossover the two are too close for noise to decide.
SPARSEC_SAMPLED_GRAD=sampled|dense forces one.

The forward y = x(W + Δ)ᵀ stays "materialize W + Δ, then one dense GEMM" (the op's
reference): tools/bench_sparse_delta.py measures it against x·Wᵀ plus a sparse x·Δᵀ.
`structured` slices are already dense sub-GEMMs in their op (no dense dW is formed).
"""

import math
import os

import torch

from ._attention_common import launch_device, mma
from ._launch import aligned, first_launch
from ._triton import HAS_TRITON, cdiv, next_pow2, no_sync_allowed, on_cuda, tl, triton

__all__ = ["HAS_TRITON", "sparse_delta_ref", "sampled_grad_ref", "sampled_grad",
           "sampled_grad_sampled", "sampled_grad_dense", "choose_method", "forget_choices",
           "choose_form", "transpose", "token_splits", "tiles", "window_tiles", "row_bounds",
           "MARGIN", "FORM_TILES"]


# references -------------------------------------------------------------------------------
def sampled_grad_ref(grad: torch.Tensor, x: torch.Tensor, indices: torch.Tensor,
                     in_features: int) -> torch.Tensor:
    """dW.flatten()[indices] for dW = gradᵀ·x, accumulated in float32 (float64 stays), one
    entry at a time in chunks: the numerics oracle."""
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    g2 = grad.reshape(-1, grad.shape[-1]).to(acc)
    x2 = x.reshape(-1, x.shape[-1]).to(acc)
    out = torch.empty(indices.numel(), dtype=acc, device=grad.device)
    chunk = max(1, (1 << 22) // max(1, g2.shape[0]))
    for s in range(0, indices.numel(), chunk):
        idx = indices[s:s + chunk]
        out[s:s + chunk] = (g2[:, idx // in_features] * x2[:, idx % in_features]).sum(0)
    return out


def sparse_delta_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """y = x (W + Δ)ᵀ + b with Δ = scatter(values at flat indices) — materialized."""
    w = weight.reshape(-1).index_add(0, indices, values.to(weight.dtype)).view_as(weight)
    return torch.nn.functional.linear(x, w, bias)


# kernels ----------------------------------------------------------------------------------
@triton.jit
def _row_bounds(Idx, Bounds, K, N_BOUNDS, WIN_ELEMS, STEPS, chunk, BB: tl.constexpr):
    """Bounds[w] = the first position in the sorted Idx[0:K] whose value is ≥ w·WIN_ELEMS, for
    the BB windows w of this chunk (a binary search per lane, STEPS ≥ log2(K + 1) halvings)."""
    w = chunk * BB + tl.arange(0, BB)
    target = w.to(tl.int64) * WIN_ELEMS
    lo = tl.zeros([BB], dtype=tl.int32)
    hi = tl.zeros([BB], dtype=tl.int32) + K
    for _ in range(0, STEPS):
        open_ = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(Idx + mid, mask=open_, other=0).to(tl.int64)
        right = open_ & (v < target)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(open_ & ~right, mid, hi)
    tl.store(Bounds + w, lo, mask=w < N_BOUNDS)


@triton.jit
def _transpose_kernel(X, Y, R, C, sxr, sxc, syc, Idx, Bounds, K, N_BOUNDS, WIN_ELEMS, STEPS,
                      BR: tl.constexpr, BC: tl.constexpr, COLS_FIRST: tl.constexpr,
                      BB: tl.constexpr):
    """Y[c, r] = X[r, c] for X [R, C]; Y's rows are syc elements apart (unit column stride).
    A 1-D grid: the first cdiv(N_BOUNDS, BB) programs make the window form's row bounds
    (`_row_bounds`; none when N_BOUNDS is 0), so no separate launch is needed and they hide
    among the transpose's; then one BR × BC tile per program, row tiles fastest, or column
    tiles with COLS_FIRST (then the last programs write the last rows of X)."""
    pid = tl.program_id(0)
    n_bounds = tl.cdiv(N_BOUNDS, BB)
    if pid < n_bounds:
        _row_bounds(Idx, Bounds, K, N_BOUNDS, WIN_ELEMS, STEPS, pid, BB)
    else:
        t = pid - n_bounds
        if COLS_FIRST:
            pc = t % tl.cdiv(C, BC)
            pr = t // tl.cdiv(C, BC)
        else:
            pr = t % tl.cdiv(R, BR)
            pc = t // tl.cdiv(R, BR)
        rows = pr * BR + tl.arange(0, BR)
        cols = pc * BC + tl.arange(0, BC)
        x = tl.load(X + rows[:, None].to(tl.int64) * sxr + cols[None, :] * sxc,
                    mask=(rows[:, None] < R) & (cols[None, :] < C))
        tl.store(Y + cols[:, None].to(tl.int64) * syc + rows[None, :], tl.trans(x),
                 mask=(cols[:, None] < C) & (rows[None, :] < R))


@triton.jit
def _chunk(Idx, K, IN, OUT, E: tl.constexpr, RW: tl.constexpr):
    """This program's chunk of E sorted entries: (entry ids, which are real, their rows and
    columns in W, the first row, how many RW-row windows the rows span)."""
    e = tl.program_id(0) * E + tl.arange(0, E)
    live = e < K
    flat = tl.load(Idx + e, mask=live, other=0).to(tl.int64)
    r = flat // IN
    c = flat % IN
    r_lo = tl.min(tl.where(live, r, OUT), 0) // 8 * 8
    r_hi = tl.max(tl.where(live, r, -1), 0)
    return e, live, r, c, r_lo, tl.maximum(r_hi - r_lo, 0) // RW + 1


@triton.jit
def _block_product(block, G, x_rows, rows, live, t_lo, t_hi, OUT, sgt, sgo,
                   TT: tl.constexpr, FP32: tl.constexpr, REVERSE: tl.constexpr):
    """block[RW, E] += Σ_t gradᵀ[rows, t] · xᵀ[entries, t] over tokens [t_lo, t_hi), tile by
    tile from the first, or from the last with REVERSE."""
    n = tl.cdiv(t_hi - t_lo, TT)
    for i in range(0, n):
        if REVERSE:
            t0 = t_lo + (n - 1 - i) * TT
        else:
            t0 = t_lo + i * TT
        t = t0 + tl.arange(0, TT)
        g = tl.load(G + t[:, None].to(tl.int64) * sgt + rows[None, :] * sgo,
                    mask=(t[:, None] < t_hi) & (rows[None, :] < OUT), other=0.0)  # [TT, RW]
        xs = tl.load(x_rows + t[None, :], mask=live[:, None] & (t[None, :] < t_hi),
                     other=0.0)                                                # [E, TT]
        block = mma(xs, g, block, FP32)                                       # [E, RW]
    return block


@triton.jit
def _block_kernel(G, XT, Idx, Out, K, T, IN, OUT, sgt, sgo, t_per,
                  E: tl.constexpr, RW: tl.constexpr, TT: tl.constexpr, FP32: tl.constexpr,
                  REVERSE: tl.constexpr):
    """Program (chunk of E entries, token range `split`): tokens [split·t_per, +t_per); row
    `split` of Out gets the chunk's sums (float32 partial sums where there are several
    ranges). Per RW-row window of the chunk the small block gradᵀ[window] · x[:, the chunk's
    columns] is accumulated, then each entry's element is taken out of it."""
    e, live, r, c, r_lo, n_win = _chunk(Idx, K, IN, OUT, E, RW)
    t_lo = tl.program_id(1) * t_per
    t_hi = tl.minimum(t_lo + t_per, T)
    Out += tl.program_id(1).to(tl.int64) * K
    x_rows = XT + c[:, None] * T
    acc = tl.zeros([E], dtype=tl.float32)
    for w in range(0, n_win):
        rows = tl.multiple_of(r_lo + w * RW, 8) + tl.arange(0, RW)
        block = _block_product(tl.zeros([E, RW], dtype=tl.float32), G, x_rows, rows, live,
                               t_lo, t_hi, OUT, sgt, sgo, TT, FP32, REVERSE)
        mine = (r[:, None] - r_lo - w * RW) == tl.arange(0, RW)[None, :]
        acc += tl.sum(tl.where(mine, block, 0.0), 1)
    tl.store(Out + e, acc.to(Out.dtype.element_ty), mask=live)


@triton.jit
def _window_kernel(G, XT, Idx, Bounds, Out, K, T, IN, OUT, sgt, sgo, t_per,
                   E: tl.constexpr, RW: tl.constexpr, TT: tl.constexpr, FP32: tl.constexpr,
                   REVERSE: tl.constexpr):
    """Program (row window w, token range as in `_block_kernel`): the entries whose row lies
    in rows [w·RW, (w+1)·RW) — the range Bounds[w]..Bounds[w+1] of the sorted indices — in
    chunks of E (one chunk unless the window holds more). Windows are aligned and disjoint,
    so every element of grad is read by one program per token range."""
    w = tl.program_id(0)
    lo = tl.load(Bounds + w)
    hi = tl.load(Bounds + w + 1)
    t_lo = tl.program_id(1) * t_per
    t_hi = tl.minimum(t_lo + t_per, T)
    Out += tl.program_id(1).to(tl.int64) * K
    rows = w * RW + tl.arange(0, RW)
    for e0 in range(lo, hi, E):
        e = e0 + tl.arange(0, E)
        live = e < hi
        flat = tl.load(Idx + e, mask=live, other=0).to(tl.int64)
        block = _block_product(tl.zeros([E, RW], dtype=tl.float32), G,
                               XT + (flat % IN)[:, None] * T, rows, live, t_lo, t_hi,
                               OUT, sgt, sgo, TT, FP32, REVERSE)
        mine = (flat // IN - w * RW)[:, None] == tl.arange(0, RW)[None, :]
        tl.store(Out + e, tl.sum(tl.where(mine, block, 0.0), 1).to(Out.dtype.element_ty),
                 mask=live)


@triton.jit
def _reduce_kernel(Part, Out, K, SPLITS, BLOCK: tl.constexpr):
    """Out[e] = Σ_s Part[s, e] (float32 partial sums of the token ranges), in Out's dtype."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, SPLITS):
        acc += tl.load(Part + s * K + e, mask=e < K, other=0.0)
    tl.store(Out + e, acc.to(Out.dtype.element_ty), mask=e < K)


# launchers --------------------------------------------------------------------------------
def _usable(*tensors) -> bool:
    return on_cuda(*tensors)


TRANSPOSE_TILE = (64, 64, 4)  # rows, columns, warps


def transpose(x: torch.Tensor, tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """xᵀ as a new contiguous tensor (Triton tiles of `tile` = (rows, columns, warps); torch
    elsewhere)."""
    if not _usable(x):
        return x.t().contiguous()
    y = torch.empty(x.shape[1], x.shape[0], dtype=x.dtype, device=x.device)
    if x.numel():
        _transpose_into(x, y, tile, None, None)
    return y


BOUNDS_BLOCK = 256  # windows per bounds program


def _transpose_into(x, y, tile, key, device, cols_first: bool = False,
                    bounds: tuple | None = None) -> None:
    """Launch the transpose of x into y; with `bounds` = (indices, out tensor, number of
    bounds, elements per window) its first programs also make the window form's row bounds."""
    r, c = x.shape
    br, bc, warps = tile or TRANSPOSE_TILE
    idx, out, n, win = bounds if bounds is not None else (y, y, 0, 0)
    k = idx.numel() if bounds is not None else 0
    grid = (cdiv(n, BOUNDS_BLOCK) + cdiv(r, br) * cdiv(c, bc),)
    _launch(key, _transpose_kernel, grid,
            (x, y, r, c, *x.stride(), r, idx, out, k, n, win, max(1, k.bit_length())),
            dict(BR=br, BC=bc, COLS_FIRST=cols_first, BB=BOUNDS_BLOCK, num_warps=warps),
            (0, 1, 7, 8), device)


def row_bounds(indices: torch.Tensor, rows: int, window: int, in_features: int) -> torch.Tensor:
    """Bounds[w] = the first position in the sorted `indices` whose row is ≥ w·window, for
    w = 0…cdiv(rows, window) (int32): what the window form's programs read, as the transpose
    kernel makes it (torch.searchsorted off CUDA and outside the interpreter)."""
    n = cdiv(rows, window) + 1
    if not _usable(indices):
        starts = torch.arange(n, device=indices.device, dtype=torch.int64) * (window * in_features)
        return torch.searchsorted(indices, starts, out_int32=True)
    out = torch.empty(n, dtype=torch.int32, device=indices.device)
    x = torch.empty(0, 0, dtype=torch.float32, device=indices.device)
    _transpose_into(x, x, None, None, None, bounds=(indices.contiguous(), out, n,
                                                    window * in_features))
    return out


def tiles(k: int, out_features: int) -> tuple[int, int]:
    """(entries per program, row-window width) of the block form: a chunk of E sorted entries
    spans about E / (k / out) rows; the window covers that with a margin."""
    per_row = max(k / max(out_features, 1), 1e-9)
    entries = 64
    span = entries / per_row
    return entries, int(min(128, max(16, next_pow2(int(span * 1.25) + 1))))


def window_tiles(k: int, out_features: int) -> tuple[int, int]:
    """(entries per chunk E, window rows RW) of the window form: the widest window (16…128
    rows) whose entries — Poisson-like, per_row·RW on average — fit one chunk of at most 128
    with four standard deviations to spare, and E the power of two that holds them (32…256;
    a window holding more loops over chunks, reading its grad rows again)."""
    per_row = k / max(out_features, 1)
    for rw in (128, 64, 32, 16):
        mean = per_row * rw
        need = mean + 4 * math.sqrt(mean) + 1
        if need <= 128:
            break
    return min(256, max(32, next_pow2(math.ceil(need)))), rw


# Where the window form wins (H100, sampled_grad on a 4096² weight, 8192 tokens, v5 tiles
# and token ranges; tools/bench_sparse_delta.py): at every density measured, 0.01–5%
# (0.102 against the block form's 0.129 ms at 0.01%, 0.119 / 0.127 at 0.1%, 0.184 / 0.210 at
# 0.3%, 0.305 / 0.329 at 0.5%): each element of grad is read once. The block form stays for
# indices in any order.
def choose_form(sorted_indices: bool = True) -> str:
    """"window" for sorted indices (the op's contract), "block" otherwise."""
    return "window" if sorted_indices else "block"


# (tokens per tile, warps, pipeline stages) per form, from the same sweep: 64-token tiles
# (the products run as Hopper wgmma with K = 64) and 4 stages in both; 8 warps for the block
# form's 64-entry chunks, 4 for the window form's.
FORM_TILES = {"block": (64, 8, 4), "window": (64, 4, 4)}


# The order in which the transpose writes xᵀ and the products read it (sampled_grad_sampled).
# "reverse": the last rows of xᵀ written are the first the products read, while they are still
# in L2 (H100, 0.1%, two runs of profile_sampled.py --quick: window form 0.120 → 0.117 ms,
# block 0.128 → 0.126; the two halves alone gain nothing; 0.01% and 0.3% unchanged).
ORDER = "reverse"
ORDERS = ("forward", "reverse", "reverse-products", "cols-first")


def _order_flags(order: str) -> tuple[bool, bool]:
    """(the transpose walks column tiles fastest, the products walk tokens last to first)."""
    if order not in ORDERS:
        raise ValueError(f"order {order!r}: use one of {ORDERS}")
    return order in ("reverse", "cols-first"), order in ("reverse", "reverse-products")


_SM_COUNT: dict = {}


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 8
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device]


def token_splits(chunks: int, T: int, device, tokens: int = 64) -> int:
    """How many token ranges to cut the sum into: about one program per SM where there are
    fewer chunks than SMs (at low density a few chunks would leave most of the GPU idle),
    else none — each range at least 8 token tiles long. More ranges than that cost more than
    they give: a second, partial wave of programs, float32 partial sums and the reduce pass
    (H100, 0.1%: 256 windows in one range 0.119 ms, in 2–8 ranges 0.135–0.151; 0.01%: 32
    windows in 4 ranges 0.103, in 16 ranges 0.113). Programs of one range run together (the
    grid's slow axis), so the rows of xᵀ that several chunks read are re-read from L2."""
    want = _sm_count(device) // max(chunks, 1)
    return max(1, min(want, T // (8 * tokens)))


_PLANS: dict = {}
_PLANS_MAX = 256


def _launch(key, kernel, grid, args: tuple, meta: dict, slots: tuple[int, ...],
            device: int | None) -> None:
    """kernel[grid](*args, **meta); with a `key` (everything the launch specializes on) the
    first call stores a direct launch (`_launch.py`) and later ones replay it with the new
    tensors in `slots`: three launches per call through Triton's JIT cost more host time
    than the kernels take at low density (H100: 0.16 ms per call against 0.12 of device
    time at 0.01%)."""
    plan = _PLANS.get(key) if key is not None else None
    if plan is not None:
        plan(*(args[i] for i in slots))
        return
    if key is None:
        kernel[grid](*args, **meta)
        return
    plan = first_launch(kernel, grid, args, meta, slots, device)
    if plan is not None:
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.pop(next(iter(_PLANS)))
        _PLANS[key] = plan


def sampled_grad_sampled(grad: torch.Tensor, x: torch.Tensor, indices: torch.Tensor,
                         in_features: int, *, form: str | None = None,
                         entries: int | None = None, window: int | None = None,
                         tokens: int | None = None, splits: int | None = None,
                         warps: int | None = None, pipeline: int | None = None,
                         transpose_tile: tuple[int, int, int] | None = None,
                         order: str | None = None) -> torch.Tensor:
    """The sampled path (see the module docstring); output in grad's dtype. `form`: "block",
    "window" (sorted indices only) or None (`choose_form`); `splits`: token ranges (None:
    `token_splits`; 1: every program runs over all tokens); `tokens`, `warps`, `pipeline`
    (the kernels' num_stages): None takes the form's `FORM_TILES`. `order` (None: `ORDER`):
    "forward" — the transpose walks token tiles fastest, the products tokens first to last;
    "reverse" — the transpose walks column tiles fastest, so its last programs write the
    last tokens' rows, and the products start there (reading what is still in L2);
    "reverse-products" / "cols-first" — one half of it each."""
    g2 = grad.reshape(-1, grad.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    T, out_f = g2.shape
    k = indices.numel()
    if k == 0 or T == 0:
        return torch.zeros(k, dtype=grad.dtype, device=grad.device)
    device = launch_device(g2)
    planned = device is not None and not no_sync_allowed()  # no plans under graph capture
    indices = indices.contiguous()
    form = form or choose_form()
    e, rw = window_tiles(k, out_f) if form == "window" else tiles(k, out_f)
    e, rw = entries or e, window or rw
    programs = cdiv(out_f, rw) if form == "window" else cdiv(k, e)
    cols_first, reverse = _order_flags(order or ORDER)
    # the transpose is launched first, so the GPU works on it while the host prepares the
    # rest; for the window form its first programs also make the row bounds
    xt = torch.empty(x2.shape[1], T, dtype=x2.dtype, device=x2.device)
    bounds = None
    if form == "window":
        bounds = (indices, torch.empty(programs + 1, dtype=torch.int32, device=grad.device),
                  programs + 1, rw * in_features)
    _transpose_into(x2, xt, transpose_tile,
                    ("transpose", T, x2.shape[1], x2.dtype, x2.stride(), transpose_tile,
                     device, aligned(x2, indices), cols_first, form, k, rw, out_f, in_features)
                    if planned else None, device, cols_first, bounds)
    tt, nw, ns = FORM_TILES[form]
    tokens, warps, pipeline = tokens or tt, warps or nw, pipeline or ns
    n_split = splits or token_splits(programs, T, grad.device, tokens)
    t_per = cdiv(cdiv(T, n_split), tokens) * tokens
    n_split = cdiv(T, t_per)
    out = torch.empty(k, dtype=grad.dtype, device=grad.device)
    part = out if n_split == 1 else \
        torch.empty(n_split, k, dtype=torch.float32, device=grad.device)
    key = None
    if planned:
        key = (form, T, out_f, in_features, k, e, rw, n_split, tokens, warps, pipeline, reverse,
               g2.dtype, xt.dtype, indices.dtype, g2.stride(), device, aligned(g2, indices))
    meta = dict(E=e, RW=rw, TT=tokens, FP32=grad.dtype == torch.float32, REVERSE=reverse,
                num_warps=warps, num_stages=pipeline)
    if form == "window":
        _launch(key and ("window",) + key, _window_kernel, (programs, n_split),
                (g2, xt, indices, bounds[1], part, k, T, in_features, out_f, *g2.stride(),
                 t_per), meta, (0, 1, 2, 3, 4), device)
    else:
        _launch(key and ("block",) + key, _block_kernel, (programs, n_split),
                (g2, xt, indices, part, k, T, in_features, out_f, *g2.stride(), t_per),
                meta, (0, 1, 2, 3), device)
    if n_split > 1:
        _launch(key and ("reduce",) + key, _reduce_kernel, (cdiv(k, 1024),),
                (part, out, k, n_split), dict(BLOCK=1024), (0, 1), device)
    return out


def sampled_grad_dense(grad: torch.Tensor, x: torch.Tensor, indices: torch.Tensor,
                       in_features: int) -> torch.Tensor:
    """dW = gradᵀ·x as one GEMM (cuBLAS, float32 accumulation), then the k entries."""
    g2 = grad.reshape(-1, grad.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    return (g2.t() @ x2).reshape(-1)[indices]


# choosing ---------------------------------------------------------------------------------
_DECISIONS: dict[tuple, str] = {}


def _key(grad, x, indices) -> tuple:
    T, out_f = grad.reshape(-1, grad.shape[-1]).shape
    in_f = x.shape[-1]
    density = indices.numel() / max(out_f * in_f, 1)
    # buckets: tokens and density by factors of 2 (the crossover moves slowly with both)
    return (out_f, in_f, next_pow2(max(T, 1)), grad.dtype, str(grad.device),
            max(-40, round(2 * math.log2(max(density, 1e-12)))))


def _model(T: int, out_f: int, in_f: int, k: int, itemsize: int) -> str:
    """Cost model (H100-class: 600 TFLOP/s dense, 2.5 TB/s): used where timing is impossible."""
    dense = 2 * T * out_f * in_f / 600e12
    sampled = (3 * T * in_f + T * out_f + 0.5 * k * T) * itemsize / 2.5e12 + 20e-6
    return "sampled" if sampled < dense else "dense"


def _run_ms(fns: dict, device, reps: int = 7) -> dict:
    """Device ms of each run of each function (reps runs each), interleaved (A, B, A, B, ...)
    so drifts in clock and temperature hit both alike, with L2 flushed before each (a 128 MB
    buffer overwritten, as triton.testing.do_bench does): each run starts from DRAM like a
    training step that ran other layers in between. The buffer lives only while timing."""
    flush = torch.empty(32 << 20, dtype=torch.int32, device=device)
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    return times


# The sampled path is taken only when it is this much faster than dense by both the median
# and the fastest of the runs: dense dW + gather is the safe side (never worse than the
# baseline by construction), and the margin keeps neighbouring densities from flipping on
# noise when the two are close. Both statistics, because on a shared GPU runs now and then
# take 2–3x longer (seen on the H100: a median of 0.99 ms among runs of 0.32–0.40 ms at
# 0.5%): a burst that lands on dense's runs moves its median, not its fastest run.
MARGIN = 0.9


def _sampled_wins(times: dict) -> bool:
    s, d = sorted(times["sampled"]), sorted(times["dense"])
    return s[len(s) // 2] < MARGIN * d[len(d) // 2] and s[0] < MARGIN * d[0]


# exact (shapes, k, dtype, device) -> decision: a repeated call skips the bucket key's math
_SEEN: dict[tuple, str] = {}


def forget_choices() -> None:
    """Drop every cached choice: the next call of each shape times both paths again."""
    _DECISIONS.clear()
    _SEEN.clear()


def choose_method(grad, x, indices, in_features) -> str:
    """'sampled' or 'dense' for this call (see the module docstring)."""
    forced = os.environ.get("SPARSEC_SAMPLED_GRAD", "auto")
    if forced in ("sampled", "dense"):
        return forced
    exact = (grad.shape, x.shape[-1], indices.numel(), grad.dtype, grad.device)
    if exact in _SEEN:
        return _SEEN[exact]
    key = _key(grad, x, indices)
    if key in _DECISIONS:
        _SEEN[exact] = _DECISIONS[key]
        return _DECISIONS[key]
    g2 = grad.reshape(-1, grad.shape[-1])
    guess = _model(g2.shape[0], g2.shape[1], in_features, indices.numel(),
                   grad.element_size())
    if not grad.is_cuda or no_sync_allowed():  # timing needs device syncs
        return guess
    t = _run_ms({"sampled": lambda: sampled_grad_sampled(grad, x, indices, in_features),
                 "dense": lambda: sampled_grad_dense(grad, x, indices, in_features)},
                grad.device)
    _DECISIONS[key] = _SEEN[exact] = "sampled" if _sampled_wins(t) else "dense"
    return _DECISIONS[key]


def sampled_grad(grad: torch.Tensor, x: torch.Tensor, indices: torch.Tensor,
                 in_features: int) -> torch.Tensor:
    """`sparsec::sampled_grad` on CUDA: the faster of the sampled kernel and dense dW + gather
    for this shape and density; dtypes the kernel does not take (and `references_only()`)
    run the reference."""
    if grad.dtype not in (torch.float16, torch.bfloat16, torch.float32) or \
            x.dtype != grad.dtype or not _usable(grad, x, indices):
        return sampled_grad_ref(grad, x, indices, in_features).to(grad.dtype)
    if choose_method(grad, x, indices, in_features) == "dense":
        return sampled_grad_dense(grad, x, indices, in_features)
    return sampled_grad_sampled(grad, x, indices, in_features)

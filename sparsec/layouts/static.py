"""Static layouts: patterns fixed by the shapes alone, built once on the host.

Lengths (window, sink, stride, global tokens) are in tokens and are rounded to blocks: a query
block keeps a key block when *any* of its queries would see *any* of its keys under the
token-level rule. The kept blocks are then computed in full (under the causal rule), so a
layout never sees less than its token-level rule asks for, and sometimes a little more.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import BadInputError
from .block_layout import BlockLayout, block_geometry, check_block, stack_heads

__all__ = ["dense", "sliding_window", "strided", "dilated", "bigbird", "per_head",
           "band_blocks", "sink_blocks", "block_ranges"]


def block_ranges(q_len: int, kv_len: int, block_q: int, block_kv: int,
                 device: torch.device | str | None = None):
    """First/last query token of each query block ([NQ, 1]) and key token of each key block
    ([1, NKV]), clipped to the sequence lengths."""
    nq, nkv = math.ceil(q_len / block_q), math.ceil(kv_len / block_kv)
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nkv, device=device)[None, :]
    return (i * block_q, torch.clamp((i + 1) * block_q, max=q_len) - 1,
            j * block_kv, torch.clamp((j + 1) * block_kv, max=kv_len) - 1)


def band_blocks(q_len: int, kv_len: int, block_q: int, block_kv: int, window: int,
                causal: bool, device: torch.device | str | None = None) -> torch.Tensor:
    """bool [NQ, NKV]: blocks holding a pair with 0 ≤ t − s < window (causal) or
    |t − s| < window (not causal)."""
    q0, q1, k0, k1 = block_ranges(q_len, kv_len, block_q, block_kv, device)
    lo, hi = q0 - k1, q1 - k0  # every integer t − s in [lo, hi] occurs in the block
    if window <= 0:
        return torch.zeros(lo.shape[0], hi.shape[1], dtype=torch.bool, device=device)
    low_edge = 0 if causal else -(window - 1)
    return (hi >= low_edge) & (lo <= window - 1)


def sink_blocks(q_len: int, kv_len: int, block_q: int, block_kv: int, sink: int,
                device: torch.device | str | None = None) -> torch.Tensor:
    """bool [NQ, NKV]: key blocks holding one of the first `sink` tokens."""
    _, _, k0, _ = block_ranges(q_len, kv_len, block_q, block_kv, device)
    nq = math.ceil(q_len / block_q)
    return (k0 < sink).expand(nq, -1)


def _finish(keep: torch.Tensor, q_len: int, kv_len: int, bq: int, bk: int,
            causal: bool) -> BlockLayout:
    return BlockLayout.from_dense_blocks(keep, q_len, kv_len, bq, bk, causal)


def _blocks(block: int, block_q: int | None, block_kv: int | None) -> tuple[int, int]:
    bq, bk = block_q or block, block_kv or block
    check_block(bq, "block_q")
    check_block(bk, "block_kv")
    return bq, bk


def _lengths(q_len: int, kv_len: int | None) -> tuple[int, int]:
    kv_len = q_len if kv_len is None else kv_len
    if q_len < 1 or kv_len < 1:
        raise BadInputError(f"sequence lengths must be ≥ 1, got q_len={q_len}, kv_len={kv_len}")
    return q_len, kv_len


def _non_negative(**values: int) -> None:
    for name, v in values.items():
        if v < 0:
            raise BadInputError(f"{name} is {v}; it must be ≥ 0 (tokens)")


def dense(q_len: int, kv_len: int | None = None, *, block: int = 64, causal: bool = True,
          block_q: int | None = None, block_kv: int | None = None,
          device: torch.device | str | None = None) -> BlockLayout:
    """Every block with a visible element: block-sparse attention that equals dense."""
    q_len, kv_len = _lengths(q_len, kv_len)
    bq, bk = _blocks(block, block_q, block_kv)
    valid, _ = block_geometry(q_len, kv_len, bq, bk, causal, device)
    return _finish(valid, q_len, kv_len, bq, bk, causal)


def sliding_window(q_len: int, kv_len: int | None = None, *, block: int = 64,
                   window: int = 256, sink: int = 0, causal: bool = True,
                   block_q: int | None = None, block_kv: int | None = None,
                   device: torch.device | str | None = None) -> BlockLayout:
    """A-shape / StreamingLLM: the last `window` tokens (both sides when not causal) plus the
    first `sink` tokens."""
    q_len, kv_len = _lengths(q_len, kv_len)
    bq, bk = _blocks(block, block_q, block_kv)
    _non_negative(window=window, sink=sink)
    keep = band_blocks(q_len, kv_len, bq, bk, window, causal, device) | \
        sink_blocks(q_len, kv_len, bq, bk, sink, device)
    return _finish(keep, q_len, kv_len, bq, bk, causal)


def strided(q_len: int, kv_len: int | None = None, *, block: int = 64, stride: int = 256,
            window: int = 256, sink: int = 0, causal: bool = True,
            block_q: int | None = None, block_kv: int | None = None,
            device: torch.device | str | None = None) -> BlockLayout:
    """Sparse Transformer's fixed pattern: a local window, plus every key block that holds the
    last token of a `stride`-token segment (the segment's summary column), plus sinks."""
    q_len, kv_len = _lengths(q_len, kv_len)
    bq, bk = _blocks(block, block_q, block_kv)
    _non_negative(window=window, sink=sink)
    if stride < 1:
        raise BadInputError(f"stride is {stride}; it must be ≥ 1 (tokens)")
    _, _, k0, k1 = block_ranges(q_len, kv_len, bq, bk, device)
    column = (k1 + 1) // stride > k0 // stride
    nq = math.ceil(q_len / bq)
    keep = band_blocks(q_len, kv_len, bq, bk, window, causal, device) | \
        sink_blocks(q_len, kv_len, bq, bk, sink, device) | column.expand(nq, -1)
    return _finish(keep, q_len, kv_len, bq, bk, causal)


def dilated(q_len: int, kv_len: int | None = None, *, block: int = 64, window: int = 1024,
            dilation: int = 2, sink: int = 0, causal: bool = True,
            block_q: int | None = None, block_kv: int | None = None,
            device: torch.device | str | None = None) -> BlockLayout:
    """A dilated window: within `window` tokens, every `dilation`-th key block counted back
    from the query block's own (diagonal) block, plus sinks. dilation=1 is a sliding window."""
    q_len, kv_len = _lengths(q_len, kv_len)
    bq, bk = _blocks(block, block_q, block_kv)
    _non_negative(window=window, sink=sink)
    if dilation < 1:
        raise BadInputError(f"dilation is {dilation}; it must be ≥ 1 (blocks)")
    q0, q1, k0, _ = block_ranges(q_len, kv_len, bq, bk, device)
    offset = q1 // bk - k0 // bk  # key blocks back from the one holding the block's last query
    on_beat = offset.abs() % dilation == 0
    keep = (band_blocks(q_len, kv_len, bq, bk, window, causal, device) & on_beat) | \
        sink_blocks(q_len, kv_len, bq, bk, sink, device)
    return _finish(keep, q_len, kv_len, bq, bk, causal)


def bigbird(q_len: int, kv_len: int | None = None, *, block: int = 64, window: int = 192,
            global_tokens: int = 64, random_blocks: int = 2, heads: int = 1, seed: int = 0,
            causal: bool = True, block_q: int | None = None, block_kv: int | None = None,
            device: torch.device | str | None = None) -> BlockLayout:
    """BigBird: a window, global tokens (the first `global_tokens` keys are seen by every query
    and their queries see every key), and `random_blocks` random key blocks per query block,
    drawn per head from a fixed seed."""
    q_len, kv_len = _lengths(q_len, kv_len)
    bq, bk = _blocks(block, block_q, block_kv)
    _non_negative(window=window, global_tokens=global_tokens, random_blocks=random_blocks)
    if heads < 1:
        raise BadInputError(f"heads is {heads}; it must be ≥ 1")
    q0, _, _, _ = block_ranges(q_len, kv_len, bq, bk, device)
    valid, _ = block_geometry(q_len, kv_len, bq, bk, causal, device)
    fixed = band_blocks(q_len, kv_len, bq, bk, window, causal, device) | \
        sink_blocks(q_len, kv_len, bq, bk, global_tokens, device) | (q0 < global_tokens)
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(heads, *valid.shape, generator=g).to(valid.device)
    noise = noise.masked_fill(~valid | fixed, -1.0)  # draw among blocks not already kept
    k = min(random_blocks, valid.shape[1])
    keep = fixed.expand(heads, -1, -1).clone()
    if k > 0:
        top = noise.topk(k, dim=-1)
        keep.scatter_(-1, top.indices, top.values >= 0)
        keep |= fixed
    return _finish(keep[None], q_len, kv_len, bq, bk, causal)


def per_head(layouts: Sequence[BlockLayout]) -> BlockLayout:
    """A per-head mixture: head h uses `layouts[h]` (each of batch 1; heads are concatenated)."""
    return stack_heads(layouts)

"""Dynamic layouts: chosen on the device from q and k, with fixed-size outputs and no host sync.

- pooled-QK block scores (mean-pooled queries and keys per block, softmax over key blocks),
  then per (batch, head, query block) either the `topk` best key blocks or the smallest set
  whose score mass reaches `threshold` (FlexPrefill / MInference block-sparse style);
- vertical-slash (MInference): the last query block's attention picks the strongest key
  columns (vertical lines) and diagonals (slash lines), rounded to blocks.

Every selector always keeps the sink tokens and the local window (in tokens, rounded to blocks
as the static layouts do). The output widths depend on shapes and options only, so the
selection is a fixed-shape function that kernels and exporters can implement as is. These are
the plain-torch implementations behind the `sparsec::block_scores`, `sparsec::select_blocks`
and `sparsec::select_blocks_vertical_slash` ops.
"""

from __future__ import annotations

import functools
import math

import torch

from .block_layout import block_geometry, dense_to_layout_tensors, host_tensors, partial_width
from .static import band_blocks, block_ranges, sink_blocks

__all__ = ["pool_blocks", "pooled_block_scores", "forced_blocks", "selection_widths",
           "select_from_scores", "select_keep", "vertical_slash_keep", "select_vertical_slash",
           "vertical_slash_widths", "kv_head_index"]

LayoutTensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def kv_head_index(q_heads: int, kv_heads: int, device: torch.device) -> torch.Tensor:
    """The key/value head each query head reads (grouped-query attention: h // group)."""
    return torch.arange(q_heads, device=device) // (q_heads // kv_heads)


def pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over each block of `block` rows of x [..., N, D] (ragged last block: its own
    rows only), in float32 (float64 stays float64)."""
    n = x.shape[-2]
    nb = math.ceil(n / block)
    work = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    pad = nb * block - n
    if pad:
        work = torch.nn.functional.pad(work, (0, 0, 0, pad))
    sums = work.unflatten(-2, (nb, block)).sum(-2)
    counts = torch.clamp(n - torch.arange(nb, device=x.device) * block, max=block)
    return sums / counts[:, None].to(sums.dtype)


def pooled_block_scores(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool,
                        block_q: int, block_kv: int) -> torch.Tensor:
    """Block-level attention estimate [B, Hq, NQ, NKV]: softmax over key blocks of
    pool(q) · pool(k) · scale; blocks with no visible element get probability 0."""
    qp = pool_blocks(q, block_q)
    kp = pool_blocks(k, block_kv)[:, kv_head_index(q.shape[1], k.shape[1], q.device)]
    logits = (qp @ kp.transpose(-1, -2)) * scale
    valid, _ = block_geometry(q.shape[-2], k.shape[-2], block_q, block_kv, causal, q.device)
    return torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)


def forced_blocks(q_len: int, kv_len: int, block_q: int, block_kv: int, causal: bool,
                  sink: int, window: int, device: torch.device | None = None) -> torch.Tensor:
    """bool [NQ, NKV]: the sink and local-window blocks every dynamic layout keeps."""
    valid, _ = block_geometry(q_len, kv_len, block_q, block_kv, causal, device)
    keep = band_blocks(q_len, kv_len, block_q, block_kv, window, causal, device) | \
        sink_blocks(q_len, kv_len, block_q, block_kv, sink, device)
    return keep & valid


@functools.lru_cache(maxsize=256)
def _forced_max(q_len: int, kv_len: int, block_q: int, block_kv: int, causal: bool,
                sink: int, window: int) -> int:
    with host_tensors():
        return int(forced_blocks(q_len, kv_len, block_q, block_kv, causal, sink, window, "cpu")
                   .sum(-1).max())


def selection_widths(q_len: int, kv_len: int, block_q: int, block_kv: int, causal: bool,
                     topk: int, threshold: float, sink: int, window: int) -> tuple[int, int]:
    """(partial width, full width) of `select_from_scores`' outputs: bounds from shapes and
    options only (topk = 0 means no cap)."""
    nkv = math.ceil(kv_len / block_kv)
    budget = topk if topk > 0 else nkv
    forced = _forced_max(q_len, kv_len, block_q, block_kv, causal, sink, window)
    return (partial_width(q_len, kv_len, block_q, block_kv, causal),
            min(nkv, forced + budget))


def select_from_scores(scores: torch.Tensor, q_len: int, kv_len: int, block_q: int,
                       block_kv: int, causal: bool, topk: int, threshold: float, sink: int,
                       window: int) -> LayoutTensors:
    """Layout tensors from block scores [B, H, NQ, NKV]; see `select_keep`."""
    keep = select_keep(scores, q_len, kv_len, block_q, block_kv, causal, topk, threshold,
                       sink, window)
    wp, wf = selection_widths(q_len, kv_len, block_q, block_kv, causal, topk, threshold,
                              sink, window)
    return dense_to_layout_tensors(keep, q_len, kv_len, block_q, block_kv, causal,
                                   full_width=wf, partial_width_=wp)


def select_keep(scores: torch.Tensor, q_len: int, kv_len: int, block_q: int, block_kv: int,
                causal: bool, topk: int, threshold: float, sink: int,
                window: int) -> torch.Tensor:
    """bool [B, H, NQ, NKV]: the blocks chosen from scores (probabilities per query block).

    threshold = 0: keep the `topk` highest-scoring blocks besides the forced ones.
    threshold > 0: keep forced blocks, then add blocks in descending score until the kept mass
    reaches `threshold`, at most `topk` of them (topk = 0: no cap).
    """
    valid, _ = block_geometry(q_len, kv_len, block_q, block_kv, causal, scores.device)
    forced = forced_blocks(q_len, kv_len, block_q, block_kv, causal, sink, window,
                           scores.device)
    candidate = valid & ~forced
    nkv = scores.shape[-1]
    budget = min(topk if topk > 0 else nkv, nkv)
    s = scores.float().masked_fill(~candidate, float("-inf"))
    vals, idx = torch.sort(s, dim=-1, descending=True, stable=True)
    rank = torch.arange(nkv, device=scores.device)
    take = (rank < budget) & (vals > float("-inf"))
    if threshold > 0:
        mass = torch.where(forced, scores.float(), 0.0).sum(-1, keepdim=True)
        p = vals.clamp(min=0.0).nan_to_num(0.0)
        before = torch.cumsum(p, dim=-1) - p
        take = take & (mass + before < threshold)
    chosen = torch.zeros_like(take).scatter_(-1, idx, take)
    return (chosen | forced) & valid


# vertical-slash ---------------------------------------------------------------------------
def vertical_slash_keep(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool,
                        block: int, vertical: int, slash: int, sink: int,
                        window: int) -> torch.Tensor:
    """bool [B, H, NQ, NKV]: blocks holding one of the `vertical` strongest key columns or
    `slash` strongest diagonals (t − s = const), as the last query block's attention ranks
    them, plus the forced blocks."""
    b, hq, L, _ = q.shape
    S = k.shape[-2]
    dev = q.device
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    rows = torch.arange((math.ceil(L / block) - 1) * block, L, device=dev)
    kk = k[:, kv_head_index(hq, k.shape[1], dev)].to(work)
    logits = (q[:, :, rows].to(work) @ kk.transpose(-1, -2)) * scale
    cols = torch.arange(S, device=dev)
    if causal:
        logits = logits.masked_fill(cols[None, :] > rows[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # [B, H, r, S]
    column_score = probs.sum(-2)
    offset = (rows[:, None] - cols[None, :] + (S - 1)).expand_as(probs)  # t − s, shifted ≥ 0
    n_off = L + S - 1
    slash_score = torch.zeros(b, hq, n_off, dtype=work, device=dev)
    slash_score.scatter_add_(-1, offset.reshape(b, hq, -1), probs.reshape(b, hq, -1))
    if causal:
        slash_score[..., :S - 1] = float("-inf")  # negative offsets are never visible
    v_sel = _top_mask(column_score, vertical)
    s_sel = _top_mask(slash_score, slash)
    q0, q1, k0, k1 = block_ranges(L, S, block, block, dev)
    # vertical: the key block holds a chosen column
    v_blocks = torch.zeros(b, hq, k0.shape[1], dtype=torch.int64, device=dev)
    v_blocks.scatter_add_(-1, (cols // block).expand(b, hq, -1), v_sel.long())
    keep = (v_blocks > 0)[:, :, None, :].expand(-1, -1, q0.shape[0], -1)
    # slash: an offset t − s in the block's range [q0 − k1, q1 − k0] was chosen
    csum = torch.cumsum(torch.nn.functional.pad(s_sel.long(), (1, 0)), dim=-1)
    lo = (q0 - k1 + (S - 1)).clamp(0, n_off)
    hi = (q1 - k0 + (S - 1) + 1).clamp(0, n_off)
    hits = csum[..., hi.reshape(-1)] - csum[..., lo.expand_as(hi).reshape(-1)]
    keep = keep | (hits.reshape(b, hq, *hi.shape) > 0)
    forced = forced_blocks(L, S, block, block, causal, sink, window, dev)
    return keep | forced


def _top_mask(score: torch.Tensor, count: int) -> torch.Tensor:
    n = score.shape[-1]
    count = min(max(count, 0), n)
    out = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    if count == 0:
        return out
    top = score.topk(count, dim=-1)
    return out.scatter_(-1, top.indices, top.values > float("-inf"))


def vertical_slash_widths(q_len: int, kv_len: int, block: int, causal: bool, vertical: int,
                          slash: int, sink: int, window: int) -> tuple[int, int]:
    """(partial width, full width) of `select_vertical_slash`: each vertical line adds at most
    one block per query block, each slash line at most two."""
    nkv = math.ceil(kv_len / block)
    forced = _forced_max(q_len, kv_len, block, block, causal, sink, window)
    return (partial_width(q_len, kv_len, block, block, causal),
            min(nkv, forced + max(vertical, 0) + 2 * max(slash, 0)))


def select_vertical_slash(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool,
                          block: int, vertical: int, slash: int, sink: int,
                          window: int) -> LayoutTensors:
    """Layout tensors of the vertical-slash selection (square blocks)."""
    keep = vertical_slash_keep(q, k, scale, causal, block, vertical, slash, sink, window)
    L, S = q.shape[-2], k.shape[-2]
    wp, wf = vertical_slash_widths(L, S, block, causal, vertical, slash, sink, window)
    return dense_to_layout_tensors(keep, L, S, block, block, causal, full_width=wf,
                                   partial_width_=wp)

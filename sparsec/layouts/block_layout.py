"""`BlockLayout`: the one representation of every attention layout (a Flex-style block-CSR).

The attention matrix of a (batch, head) is cut into blocks of `block_q` queries × `block_kv`
keys. For each (batch, head, query block) a layout lists the key blocks that are computed, in
two disjoint lists, each sorted ascending and padded to a fixed width:

- `kv_num_blocks[b, h, i]` / `kv_indices[b, h, i, :]`: *partial* blocks, which need an element
  mask: the causal diagonal, and the ragged last key block when `kv_len % block_kv != 0`;
- `full_kv_num_blocks[b, h, i]` / `full_kv_indices[b, h, i, :]`: *full* blocks, in which every
  key is in range and (when causal) visible to every query of the block: no mask is needed.

This is the split FlexAttention's BlockMask makes (same field names), with `int32` tensors whose
batch and head dimensions are either the real size or 1 (broadcast). Entries past a row's count
are padding (value 0) and must never be read.

Element semantics. Query `t` (0 ≤ t < q_len) may attend key `s` iff the block
(t // block_q, s // block_kv) is kept, s < kv_len, and, when `causal`, s ≤ t (top-left
aligned, as `scaled_dot_product_attention(is_causal=True)`). A kept block that has no visible
element under these rules is never listed. A user's element mask (padding) is applied on top of
this by the op, not stored here.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Iterable

import torch

from ..errors import BadInputError

__all__ = ["BlockLayout", "block_geometry", "dense_to_layout_tensors", "partial_width",
           "stack_heads", "host_tensors", "BLOCK_SIZES", "check_block"]

# Block sizes the kernels tile with (Triton needs powers of two, ≥ 16 for tensor cores).
BLOCK_SIZES = (16, 32, 64, 128)


def check_block(block: int, what: str = "block") -> None:
    if block not in BLOCK_SIZES:
        raise BadInputError(f"{what} is {block}; choose one of {', '.join(map(str, BLOCK_SIZES))}")


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """A block-sparse attention layout; see the module docstring for the exact semantics."""

    kv_num_blocks: torch.Tensor       # int32 [B, H, NQ]     partial blocks per query block
    kv_indices: torch.Tensor          # int32 [B, H, NQ, KP] their key-block indices, ascending
    full_kv_num_blocks: torch.Tensor  # int32 [B, H, NQ]     full blocks per query block
    full_kv_indices: torch.Tensor     # int32 [B, H, NQ, KF] their key-block indices, ascending
    q_len: int
    kv_len: int
    block_q: int
    block_kv: int
    causal: bool

    # shape ------------------------------------------------------------------------------------
    @property
    def num_q_blocks(self) -> int:
        return math.ceil(self.q_len / self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return math.ceil(self.kv_len / self.block_kv)

    @property
    def batch(self) -> int:
        return self.kv_num_blocks.shape[0]

    @property
    def heads(self) -> int:
        return self.kv_num_blocks.shape[1]

    @property
    def device(self) -> torch.device:
        return self.kv_num_blocks.device

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The four tensors, in the order the ops take them."""
        return (self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks,
                self.full_kv_indices)

    def to(self, device: torch.device | str) -> "BlockLayout":
        moved = [t.to(device) for t in self.tensors()]
        return BlockLayout(*moved, self.q_len, self.kv_len, self.block_q, self.block_kv,
                           self.causal)

    # conversions ----------------------------------------------------------------------------
    def block_kinds(self) -> torch.Tensor:
        """int8 [B, H, NQ, NKV]: 0 dropped, 1 partial (masked), 2 full."""
        b, h, nq = self.kv_num_blocks.shape
        kinds = torch.zeros(b, h, nq, self.num_kv_blocks + 1, dtype=torch.int8,
                            device=self.device)
        for num, idx, value in ((self.kv_num_blocks, self.kv_indices, 1),
                                (self.full_kv_num_blocks, self.full_kv_indices, 2)):
            slot = torch.arange(idx.shape[-1], device=self.device)
            live = slot < num[..., None].long()
            # padding goes to the spare last column, which is cut off below
            target = torch.where(live, idx.long(), self.num_kv_blocks)
            kinds.scatter_(-1, target, torch.full_like(target, value, dtype=torch.int8))
        return kinds[..., :self.num_kv_blocks]

    def to_dense_blocks(self) -> torch.Tensor:
        """bool [B, H, NQ, NKV]: which blocks are computed (partial or full)."""
        return self.block_kinds() > 0

    def to_element_mask(self) -> torch.Tensor:
        """bool [B, H, q_len, kv_len]: which (query, key) pairs attend (for tests and refs)."""
        dense = self.to_dense_blocks()
        rows = torch.arange(self.q_len, device=self.device) // self.block_q
        cols = torch.arange(self.kv_len, device=self.device) // self.block_kv
        mask = dense[:, :, rows][:, :, :, cols]
        if self.causal:
            t = torch.arange(self.q_len, device=self.device)
            s = torch.arange(self.kv_len, device=self.device)
            mask = mask & (s[None, :] <= t[:, None])
        return mask

    # statistics -----------------------------------------------------------------------------
    def grid(self) -> str:
        """Which block grid `density` is a fraction of: 'causal' or 'full'."""
        return "causal" if self.causal else "full"

    def grid_blocks(self) -> int:
        """Blocks in one (batch, head) grid: every block with a visible element."""
        valid, _ = block_geometry(self.q_len, self.kv_len, self.block_q, self.block_kv,
                                  self.causal, self.device)
        return int(valid.sum())

    def kept_blocks(self) -> torch.Tensor:
        """int64 [B, H]: blocks computed per (batch, head)."""
        return (self.kv_num_blocks.long() + self.full_kv_num_blocks.long()).sum(-1)

    def density(self) -> float:
        """Kept fraction of the block grid (`grid()` says which), averaged over batch × head."""
        return float(self.kept_blocks().double().mean()) / max(self.grid_blocks(), 1)

    # checks ---------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise BadInputError if the tensors break the format's invariants (host sync)."""
        check_block(self.block_q, "block_q")
        check_block(self.block_kv, "block_kv")
        nq, nkv = self.num_q_blocks, self.num_kv_blocks
        for name, t in zip(("kv_num_blocks", "kv_indices", "full_kv_num_blocks",
                            "full_kv_indices"), self.tensors()):
            if t.dtype != torch.int32:
                raise BadInputError(f"layout {name} is {t.dtype}; layouts hold int32 tensors")
            want = 3 if "num" in name else 4
            if t.dim() != want or t.shape[2] != nq:
                raise BadInputError(f"layout {name} has shape {tuple(t.shape)}; expected "
                                    f"{want} dims with {nq} query blocks in dim 2")
        for num, idx in ((self.kv_num_blocks, self.kv_indices),
                         (self.full_kv_num_blocks, self.full_kv_indices)):
            if num.shape != idx.shape[:3]:
                raise BadInputError("layout counts and indices disagree in batch/head shape")
            if bool((num < 0).any()) or bool((num > idx.shape[-1]).any()):
                raise BadInputError("layout counts exceed the index width")
            live = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
            if bool(((idx < 0) | (idx >= nkv))[live].any()):
                raise BadInputError(f"layout indices out of range [0, {nkv})")
            step = idx[..., 1:] > idx[..., :-1]
            if bool((~step & live[..., 1:]).any()):
                raise BadInputError("layout indices are not strictly ascending")
        kinds_p = self._as_dense(self.kv_num_blocks, self.kv_indices)
        kinds_f = self._as_dense(self.full_kv_num_blocks, self.full_kv_indices)
        if bool((kinds_p & kinds_f).any()):
            raise BadInputError("a block is listed as both partial and full")
        valid, partial = block_geometry(self.q_len, self.kv_len, self.block_q, self.block_kv,
                                        self.causal, self.device)
        if bool((kinds_f & partial).any()):
            raise BadInputError("a block that needs masking is listed as full")
        if bool(((kinds_p | kinds_f) & ~valid).any()):
            raise BadInputError("a block with no visible element is listed")

    def _as_dense(self, num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        nkv = self.num_kv_blocks
        out = torch.zeros(*num.shape, nkv + 1, dtype=torch.bool, device=num.device)
        live = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
        out.scatter_(-1, torch.where(live, idx.long(), nkv), True)
        return out[..., :nkv]

    # construction ---------------------------------------------------------------------------
    @classmethod
    def from_dense_blocks(cls, keep: torch.Tensor, q_len: int, kv_len: int, block_q: int,
                          block_kv: int, causal: bool, *, width: int | None = None
                          ) -> "BlockLayout":
        """From a bool [B, H, NQ, NKV] (or [NQ, NKV]) block mask; blocks with no visible
        element are dropped, the rest split into partial and full. `width` fixes the full
        list's width (default: the largest count, which reads the tensor on the host)."""
        while keep.dim() < 4:
            keep = keep[None]
        tensors = dense_to_layout_tensors(keep.bool(), q_len, kv_len, block_q, block_kv,
                                          causal, full_width=width)
        return cls(*tensors, q_len, kv_len, block_q, block_kv, causal)

    def __repr__(self) -> str:
        return (f"BlockLayout(batch={self.batch}, heads={self.heads}, q_len={self.q_len}, "
                f"kv_len={self.kv_len}, block=({self.block_q}, {self.block_kv}), "
                f"causal={self.causal}, widths=({self.kv_indices.shape[-1]}, "
                f"{self.full_kv_indices.shape[-1]}), density={self.density():.3f} of "
                f"{self.grid()} grid)")


# geometry ---------------------------------------------------------------------------------
def block_geometry(q_len: int, kv_len: int, block_q: int, block_kv: int, causal: bool,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [NQ, NKV] pair: (valid: the block has a visible element, partial: valid but needs
    an element mask). Depends on shapes only, so it never syncs with the device."""
    nq, nkv = math.ceil(q_len / block_q), math.ceil(kv_len / block_kv)
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nkv, device=device)[None, :]
    q_first, q_last = i * block_q, torch.clamp((i + 1) * block_q, max=q_len) - 1
    k_first, k_last = j * block_kv, (j + 1) * block_kv - 1
    in_range = k_last < kv_len
    if causal:
        valid = k_first <= q_last
        full = in_range & (k_last <= q_first)
    else:
        valid = torch.ones(nq, nkv, dtype=torch.bool, device=device)
        full = in_range.expand(nq, nkv)
    return valid, valid & ~full


@functools.lru_cache(maxsize=256)
def partial_width(q_len: int, kv_len: int, block_q: int, block_kv: int, causal: bool) -> int:
    """The most partial blocks any query block can have (a static bound for fixed widths)."""
    with host_tensors():
        _, partial = block_geometry(q_len, kv_len, block_q, block_kv, causal, "cpu")
        return int(partial.sum(-1).max()) if partial.numel() else 0


def host_tensors():
    """A context where torch makes real CPU tensors even while tracing with fake tensors:
    shape-only computations (widths, geometry bounds) must give concrete numbers."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    return unset_fake_temporarily()


def dense_to_layout_tensors(keep: torch.Tensor, q_len: int, kv_len: int, block_q: int,
                            block_kv: int, causal: bool, *, full_width: int | None = None,
                            partial_width_: int | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """bool [B, H, NQ, NKV] → (kv_num_blocks, kv_indices, full_kv_num_blocks,
    full_kv_indices). With both widths given it runs on the device with no host sync."""
    valid, partial = block_geometry(q_len, kv_len, block_q, block_kv, causal, keep.device)
    keep = keep & valid
    part, full = keep & partial, keep & ~partial
    if partial_width_ is None:
        partial_width_ = partial_width(q_len, kv_len, block_q, block_kv, causal)
    if full_width is None:
        full_width = int(full.sum(-1).max()) if full.numel() else 0
    return (*_compress(part, partial_width_), *_compress(full, full_width))


def _compress(keep: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts and ascending indices of True entries along the last dim, padded with 0."""
    nkv = keep.shape[-1]
    cols = torch.arange(nkv, device=keep.device, dtype=torch.int32)
    key = torch.where(keep, cols, torch.full_like(cols, nkv))
    order = torch.sort(key, dim=-1).values[..., :width]
    if order.shape[-1] < width:  # width larger than the grid: pad
        pad = torch.full((*order.shape[:-1], width - order.shape[-1]), nkv,
                         dtype=order.dtype, device=order.device)
        order = torch.cat([order, pad], -1)
    idx = torch.where(order < nkv, order, torch.zeros_like(order)).to(torch.int32)
    return keep.sum(-1, dtype=torch.int32).clamp(max=width), idx


def stack_heads(layouts: Iterable[BlockLayout]) -> BlockLayout:
    """Layouts of one (batch, head) each, stacked along the head dim (per-head mixtures)."""
    items = list(layouts)
    if not items:
        raise BadInputError("a per-head mixture needs at least one layout")
    first = items[0]
    geo = (first.q_len, first.kv_len, first.block_q, first.block_kv, first.causal)
    for lay in items:
        if (lay.q_len, lay.kv_len, lay.block_q, lay.block_kv, lay.causal) != geo:
            raise BadInputError("per-head layouts must share lengths, blocks and causality")
        if lay.batch != 1:
            raise BadInputError("per-head layouts must have batch dimension 1")
    keep = torch.cat([lay.to_dense_blocks() for lay in items], dim=1)
    return BlockLayout.from_dense_blocks(keep, *geo)

"""Triton kernels, one file each, with their plain-torch reference beside them.

- `block_sparse_attention` (+ `block_sparse_attention_bwd`): the attention op's forward and
  backward (the op looks the launchers up by name on CUDA);
- `block_select`: dynamic block selection (pooled-QK scores, top-k / threshold);
- `sparse_delta`: the sampled dense–dense product for sparse-delta gradients;
- `nm_mask`: N:M masks and the SR-STE term.

The ops find them on CUDA by themselves (attention and selection look their launchers up per
call; the fine-tuning ops have CUDA registrations that import these modules on first use), so
importing sparsec never imports Triton. `load_kernels()` imports them all up front;
`references_only()` makes every launcher run its reference (the triton backend verifies the
kernels against it); `KERNEL_OPS` says which op runs on which kernel.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Iterator

__all__ = ["KERNEL_OPS", "load_kernels", "references_only", "kernels_for"]

# sparsec op (as it appears in a graph) -> the kernels it runs on CUDA (its backward included)
KERNEL_OPS: dict[str, tuple[str, ...]] = {
    "block_sparse_attention": ("block_sparse_attention", "block_sparse_attention_backward"),
    "block_sparse_attention_backward": ("block_sparse_attention_backward",),
    "block_scores": ("block_scores",),
    "select_blocks": ("select_blocks",),
    "sparse_delta_linear": ("sampled_grad",),
    "sampled_grad": ("sampled_grad",),
    "nm_linear": ("nm_linear", "nm_mask", "nm_grad_weight"),
    "nm_mask": ("nm_mask",),
    "nm_grad_weight": ("nm_grad_weight",),
}

_MODULES = ("block_sparse_attention", "block_select", "sparse_delta", "nm_mask")


def load_kernels() -> list[str]:
    """Import every kernel module (compiling nothing yet); return those whose Triton kernels
    are usable."""
    return [name for name in _MODULES
            if getattr(importlib.import_module(f"{__name__}.{name}"), "HAS_TRITON", False)]


def kernels_for(op_names) -> list[str]:
    """The kernels the given sparsec ops run on, in a stable order, without repeats."""
    out: list[str] = []
    for op in op_names:
        for k in KERNEL_OPS.get(op, ()):
            if k not in out:
                out.append(k)
    return out


@contextlib.contextmanager
def references_only() -> Iterator[None]:
    """Within the block, every kernel launcher runs its plain-torch reference instead."""
    from . import _triton

    old = _triton.FORCE_REFERENCE
    _triton.FORCE_REFERENCE = True
    try:
        yield
    finally:
        _triton.FORCE_REFERENCE = old

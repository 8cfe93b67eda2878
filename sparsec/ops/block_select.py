"""Dynamic block selection ops: block scores and layouts computed on the device.

    probs = torch.ops.sparsec.block_scores(q, k, scale, causal, block_q, block_kv)
    num, idx, full_num, full_idx = torch.ops.sparsec.select_blocks(
        probs, q_len, kv_len, causal, block_q, block_kv, topk, threshold, sink, window)
    num, idx, full_num, full_idx = torch.ops.sparsec.select_blocks_vertical_slash(
        q, k, scale, causal, block, vertical, slash, sink, window)

`block_scores` returns float32 [B, Hq, NQ, NKV] probabilities (pooled-QK softmax over key
blocks). `select_blocks` turns any such probabilities (pooled-QK or a learned gate's) into the
four int32 layout tensors of a `BlockLayout`; `sink` and `window` are in tokens. Output widths
depend on shapes and options only (`sparsec.layouts.dynamic.selection_widths`), so the ops have
exact fake implementations and never synchronize with the host. The outputs are integers: no
gradient flows through selection.

Dispatch: on CUDA with the Triton module `sparsec.kernels.block_select` usable, `block_scores`
and `select_blocks` run its kernels (same semantics); elsewhere the plain-torch functions of
`sparsec.layouts.dynamic`. Vertical-slash always runs in PyTorch.
"""

from __future__ import annotations

import importlib
import math

import torch
from torch import Tensor

from ..layouts.dynamic import (
    pooled_block_scores,
    select_from_scores,
    select_vertical_slash,
    selection_widths,
    vertical_slash_widths,
)

__all__ = ["block_scores_op", "select_blocks_op", "select_vertical_slash_op"]


def _kernel(t: Tensor, name: str):
    """The Triton launcher `name` for tensors on CUDA, if the kernel module is usable."""
    if not t.is_cuda:
        return None
    try:
        mod = importlib.import_module("sparsec.kernels.block_select")
    except ImportError:
        return None
    return getattr(mod, name) if mod.HAS_TRITON else None


def _layout_fake(like: Tensor, b: int, h: int, nq: int, widths: tuple[int, int]):
    wp, wf = widths
    i32 = torch.int32
    return (like.new_empty(b, h, nq, dtype=i32), like.new_empty(b, h, nq, wp, dtype=i32),
            like.new_empty(b, h, nq, dtype=i32), like.new_empty(b, h, nq, wf, dtype=i32))


@torch.library.custom_op("sparsec::block_scores", mutates_args=())
def block_scores_op(q: Tensor, k: Tensor, scale: float, causal: bool, block_q: int,
                    block_kv: int) -> Tensor:
    kernel = _kernel(q, "block_scores")
    if kernel is not None:
        return kernel(q, k, scale, causal, block_q, block_kv)
    return pooled_block_scores(q, k, scale, causal, block_q, block_kv).float()


@block_scores_op.register_fake
def _scores_fake(q, k, scale, causal, block_q, block_kv):
    b, h, L, _ = q.shape
    return q.new_empty(b, h, math.ceil(L / block_q), math.ceil(k.shape[-2] / block_kv),
                       dtype=torch.float32)


@torch.library.custom_op("sparsec::select_blocks", mutates_args=())
def select_blocks_op(scores: Tensor, q_len: int, kv_len: int, causal: bool, block_q: int,
                     block_kv: int, topk: int, threshold: float, sink: int,
                     window: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    kernel = _kernel(scores, "select_blocks")
    if kernel is not None:
        return kernel(scores.detach(), q_len, kv_len, causal, block_q, block_kv, topk,
                      threshold, sink, window)
    return select_from_scores(scores.detach(), q_len, kv_len, block_q, block_kv, causal, topk,
                              threshold, sink, window)


@select_blocks_op.register_fake
def _select_fake(scores, q_len, kv_len, causal, block_q, block_kv, topk, threshold, sink,
                 window):
    b, h, nq, _ = scores.shape
    widths = selection_widths(q_len, kv_len, block_q, block_kv, causal, topk, threshold, sink,
                              window)
    return _layout_fake(scores, b, h, nq, widths)


@torch.library.custom_op("sparsec::select_blocks_vertical_slash", mutates_args=())
def select_vertical_slash_op(q: Tensor, k: Tensor, scale: float, causal: bool, block: int,
                             vertical: int, slash: int, sink: int,
                             window: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return select_vertical_slash(q.detach(), k.detach(), scale, causal, block, vertical, slash,
                                 sink, window)


@select_vertical_slash_op.register_fake
def _vs_fake(q, k, scale, causal, block, vertical, slash, sink, window):
    b, h = q.shape[:2]
    L, S = int(q.shape[2]), int(k.shape[2])  # widths follow the lengths: specialize them
    widths = vertical_slash_widths(L, S, block, causal, vertical, slash, sink, window)
    return _layout_fake(q, b, h, math.ceil(L / block), widths)


# ONNX translations -----------------------------------------------------------------------------
# Kept apart from the dispatch above; they live in sparsec.ops.onnx_select, imported only when a
# model is exported.
from . import onnx_translation  # noqa: E402


@onnx_translation(block_scores_op._opoverload)
def _block_scores_onnx(q, k, scale: float, causal: bool, block_q: int, block_kv: int):
    from .onnx_select import block_scores_onnx

    return block_scores_onnx(q, k, scale, causal, block_q, block_kv)


@onnx_translation(select_blocks_op._opoverload)
def _select_blocks_onnx(scores, q_len: int, kv_len: int, causal: bool, block_q: int,
                        block_kv: int, topk: int, threshold: float, sink: int, window: int):
    from .onnx_select import select_blocks_onnx

    return select_blocks_onnx(scores, q_len, kv_len, causal, block_q, block_kv, topk, threshold,
                              sink, window)


@onnx_translation(select_vertical_slash_op._opoverload)
def _select_vertical_slash_onnx(q, k, scale: float, causal: bool, block: int, vertical: int,
                                slash: int, sink: int, window: int):
    from .onnx_select import select_vertical_slash_onnx

    return select_vertical_slash_onnx(q, k, scale, causal, block, vertical, slash, sink, window)

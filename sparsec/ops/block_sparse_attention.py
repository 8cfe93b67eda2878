"""`sparsec::block_sparse_attention` and its backward op.

    out, lse = torch.ops.sparsec.block_sparse_attention(
        q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
        attn_mask, scale, causal, block_q, block_kv, softcap=0.0)

q [B, Hq, L, D]; k [B, Hkv, S, D] and v [B, Hkv, S, Dv] with Hq a multiple of Hkv (query head
h reads key/value head h // (Hq / Hkv)); the four layout tensors of a `BlockLayout` (batch and
head dims of size B or 1, Hq or 1); `attn_mask` None, bool (True = attend) or float (added),
broadcastable to [B, Hq, L, S]; `softcap` > 0 caps the scaled scores, s → softcap·tanh(s /
softcap), before the mask is added (Gemma 2; 0 = none). Returns out [B, Hq, L, Dv] in q's
dtype and the logsumexp lse [B, Hq, L] (float32; float64 for float64 inputs), which is not
differentiable. All outputs (and the backward's dq, dk, dv) are contiguous, whatever the
inputs' strides. Semantics
are in `sparsec.ops.attention_reference`. Gradients flow to q, k and v through
`sparsec::block_sparse_attention_backward`, itself an op, so a joint graph shows it; when a
float `attn_mask` (an additive bias, e.g. T5's relative positions) requires grad,
`sparsec::block_sparse_attention_bias_backward` runs instead and also returns its gradient
(dS summed over the mask's broadcast dims; a bool mask never gets one).

Dispatch (`select_impl`): on CUDA with a Triton kernel module
`sparsec.kernels.block_sparse_attention` that takes the inputs (dtype, blocks, head dim), its
`block_sparse_attention` / `block_sparse_attention_backward` launchers (same arguments as the
ops) run; otherwise the forward runs the gathered-block path (only kept blocks
are computed) and the backward the reference formulas. Eager calls of
`block_sparse_attention()` on plain CUDA tensors (no tracing, compiling, functorch transform or
dispatch mode) run the same launchers under a plain autograd.Function, skipping the custom
op's dispatch (SPARSEC_EAGER=op keeps them on the op).
"""

from __future__ import annotations

import importlib
import math
from typing import Optional

import torch
from torch import Tensor

from .attention_reference import (
    block_sparse_attention_backward_ref,
    block_sparse_attention_bias_backward_ref,
    block_sparse_attention_gathered,
    fold_bias_grad,
    work_dtype,
)

__all__ = ["block_sparse_attention", "attention_op", "attention_backward_op",
           "attention_bias_backward_op", "kernel_module", "select_impl"]

_KERNEL_MODULE = "sparsec.kernels.block_sparse_attention"


def kernel_module():
    """The Triton kernel module if it is installed and usable, else None."""
    try:
        mod = importlib.import_module(_KERNEL_MODULE)
    except ImportError:
        return None
    return mod if getattr(mod, "HAS_TRITON", False) else None


def select_impl(q: Tensor, k: Tensor, v: Tensor, block_q: int, block_kv: int
                ) -> tuple[str, str]:
    """("kernel", "") where the Triton launchers run these inputs, else ("reference", why).

    The one place that decides: the three ops and the eager autograd.Function ask here. The
    launchers keep the same test (`kernel_supports`, which also honours
    `sparsec.kernels.references_only()`) for callers that launch them directly."""
    if not q.is_cuda:
        return "reference", "tensors are not on a CUDA device"
    mod = kernel_module()
    if mod is None:
        return "reference", "triton is not installed"
    why = mod.kernel_supports(q, k, v, block_q, block_kv)
    return ("reference", why) if why else ("kernel", "")


def _on_kernel(q: Tensor, k: Tensor, v: Tensor, block_q: int, block_kv: int) -> bool:
    return select_impl(q, k, v, block_q, block_kv)[0] == "kernel"


def _kernel_bias_backward(*args) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, d attn_mask) from the backward launcher (args as the bias-backward op's)."""
    *grads, ds = kernel_module().block_sparse_attention_backward(*args, bias_grad=True)
    return (*grads, fold_bias_grad(ds, args[10]))


@torch.library.custom_op("sparsec::block_sparse_attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor,
                 full_kv_num_blocks: Tensor, full_kv_indices: Tensor,
                 attn_mask: Optional[Tensor], scale: float, causal: bool, block_q: int,
                 block_kv: int, softcap: float = 0.0) -> tuple[Tensor, Tensor]:
    args = (q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
            attn_mask, scale, causal, block_q, block_kv, softcap)
    if _on_kernel(q, k, v, block_q, block_kv):
        return kernel_module().block_sparse_attention(*args)
    return block_sparse_attention_gathered(*args)


@attention_op.register_fake
def _attention_fake(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                    attn_mask, scale, causal, block_q, block_kv, softcap=0.0):
    _check_shapes(q, k, v, kv_num_blocks, block_q)
    b, h, L, _ = q.shape
    out = q.new_empty(b, h, L, v.shape[-1])
    return out, q.new_empty(b, h, L, dtype=work_dtype(q.dtype))


@torch.library.custom_op("sparsec::block_sparse_attention_backward", mutates_args=())
def attention_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                          lse: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor,
                          full_kv_num_blocks: Tensor, full_kv_indices: Tensor,
                          attn_mask: Optional[Tensor], scale: float, causal: bool,
                          block_q: int, block_kv: int, softcap: float = 0.0
                          ) -> tuple[Tensor, Tensor, Tensor]:
    args = (grad_out, q, k, v, out, lse, kv_num_blocks, kv_indices, full_kv_num_blocks,
            full_kv_indices, attn_mask, scale, causal, block_q, block_kv, softcap)
    if _on_kernel(q, k, v, block_q, block_kv):
        return kernel_module().block_sparse_attention_backward(*args)
    return block_sparse_attention_backward_ref(*args)


@attention_backward_op.register_fake
def _backward_fake(grad_out, q, k, v, out, lse, kv_num_blocks, kv_indices, full_kv_num_blocks,
                   full_kv_indices, attn_mask, scale, causal, block_q, block_kv, softcap=0.0):
    # the gradients are contiguous whatever q, k, v's strides (kernels must match this)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


@torch.library.custom_op("sparsec::block_sparse_attention_bias_backward", mutates_args=())
def attention_bias_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                               lse: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor,
                               full_kv_num_blocks: Tensor, full_kv_indices: Tensor,
                               attn_mask: Tensor, scale: float, causal: bool, block_q: int,
                               block_kv: int, softcap: float = 0.0
                               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, d attn_mask): the backward when the float mask (a bias) needs a gradient."""
    args = (grad_out, q, k, v, out, lse, kv_num_blocks, kv_indices, full_kv_num_blocks,
            full_kv_indices, attn_mask, scale, causal, block_q, block_kv, softcap)
    if _on_kernel(q, k, v, block_q, block_kv):
        return _kernel_bias_backward(*args)
    return block_sparse_attention_bias_backward_ref(*args)


@attention_bias_backward_op.register_fake
def _bias_backward_fake(grad_out, q, k, v, out, lse, kv_num_blocks, kv_indices,
                        full_kv_num_blocks, full_kv_indices, attn_mask, scale, causal, block_q,
                        block_kv, softcap=0.0):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            attn_mask.new_empty(attn_mask.shape))


def _wants_bias_grad(ctx, mask: Tensor | None) -> bool:
    return mask is not None and mask.is_floating_point() and ctx.needs_input_grad[7]


def _save(ctx, inputs, out: Tensor, lse: Tensor) -> None:
    """What both autograd wrappers (the op's and `_EagerAttention`) keep for the backward."""
    q, k, v, num, idx, fnum, fidx, mask, *options = inputs
    ctx.save_for_backward(q, k, v, out, lse, num, idx, fnum, fidx, mask)
    ctx.options = tuple(options)  # scale, causal, block_q, block_kv, softcap
    ctx.mark_non_differentiable(lse)


def _grads(ctx, grad_out: Tensor | None, backward, bias_backward) -> tuple:
    """The gradients of the 13 forward inputs: `backward` gives (dq, dk, dv), `bias_backward`
    also d attn_mask (run when a float mask needs a gradient)."""
    q, k, v, out, lse, num, idx, fnum, fidx, mask = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    args = (grad_out.contiguous(), q, k, v, out, lse, num, idx, fnum, fidx, mask, *ctx.options)
    dmask = None
    if _wants_bias_grad(ctx, mask):
        dq, dk, dv, dmask = bias_backward(*args)
    else:
        dq, dk, dv = backward(*args)
    return dq, dk, dv, None, None, None, None, dmask, None, None, None, None, None


def _setup_context(ctx, inputs, output) -> None:
    _save(ctx, inputs, *output)


def _backward(ctx, grad_out, _grad_lse):
    return _grads(ctx, grad_out, attention_backward_op, attention_bias_backward_op)


attention_op.register_autograd(_backward, setup_context=_setup_context)


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, num: Tensor, block_q: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("block_sparse_attention takes 4-D q, k, v [batch, heads, length, dim]")
    if q.shape[1] % k.shape[1] or k.shape[1] != v.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads "
                         f"({k.shape[1]}, {v.shape[1]})")
    if num.shape[-1] != math.ceil(q.shape[2] / block_q):
        raise ValueError(f"layout has {num.shape[-1]} query blocks; q has "
                         f"{math.ceil(q.shape[2] / block_q)} of {block_q}")


class _EagerAttention(torch.autograd.Function):
    """The op's forward and backward launchers under a plain autograd.Function: eager calls
    on CUDA skip the custom op's dispatch and autograd wrapper (tens of microseconds per call,
    which at short lengths is as long as the kernel). Same launchers, same numbers; traced,
    compiled and subclass-tensor calls keep going through the op."""

    @staticmethod
    def forward(ctx, q, k, v, num, idx, fnum, fidx, mask, scale, causal, block_q, block_kv,
                softcap):
        inputs = (q, k, v, num, idx, fnum, fidx, mask, scale, causal, block_q, block_kv, softcap)
        out, lse = kernel_module().block_sparse_attention(*inputs)
        _save(ctx, inputs, out, lse)
        ctx.set_materialize_grads(False)  # lse has no gradient: no zero tensor for it
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_lse):
        return _grads(ctx, grad_out, kernel_module().block_sparse_attention_backward,
                      _kernel_bias_backward)


def _eager_kernels(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, block_q: int,
                   block_kv: int) -> bool:
    """True where `_EagerAttention` may stand in for the op: plain CUDA tensors, no tracing,
    compiling, functorch transform or dispatch mode (those must see the op), `select_impl`
    choosing the kernels and SETTINGS.eager == "function"."""
    if type(q) is not Tensor or type(k) is not Tensor or \
            type(v) is not Tensor or (mask is not None and type(mask) is not Tensor):
        return False
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active() or \
            torch._C._len_torch_dispatch_stack() > 0:
        return False
    if not _on_kernel(q, k, v, block_q, block_kv):
        return False
    from ..kernels import _triton

    return _triton.SETTINGS.eager == "function"


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, layout, *,
                           attn_mask: Tensor | None = None, scale: float | None = None,
                           return_lse: bool = False, softcap: float = 0.0):
    """Attention of q, k, v under a `BlockLayout` (and an optional element `attn_mask`).

    `scale` defaults to 1/sqrt(head dim), as in `scaled_dot_product_attention`; `softcap` > 0
    caps the scaled scores (softcap · tanh(s / softcap)) before the mask is added.
    """
    if softcap < 0:
        raise ValueError(f"softcap must be ≥ 0 (0 = none), got {softcap}")
    if (q.shape[-2], k.shape[-2]) != (layout.q_len, layout.kv_len):
        raise ValueError(f"layout is for lengths ({layout.q_len}, {layout.kv_len}); q and k "
                         f"have ({q.shape[-2]}, {k.shape[-2]})")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    eager = _eager_kernels(q, k, v, attn_mask, layout.block_q, layout.block_kv)
    op = _EagerAttention.apply if eager else attention_op
    out, lse = op(q, k, v, *layout.tensors(), attn_mask, scale, layout.causal, layout.block_q,
                  layout.block_kv, float(softcap))
    return (out, lse) if return_lse else out


# ONNX translation ------------------------------------------------------------------------------
# Kept apart from the dispatch above: the forms (gathered blocks, dense, onnxruntime's contrib
# op) live in sparsec.ops.onnx_attention, imported only when a model is exported.
from . import onnx_translation  # noqa: E402


@onnx_translation(attention_op._opoverload)
def _attention_onnx(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                    attn_mask, scale: float, causal: bool, block_q: int, block_kv: int,
                    softcap: float = 0.0):
    from .onnx_attention import translate_attention

    return translate_attention(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks,
                               full_kv_indices, attn_mask, scale, causal, block_q, block_kv,
                               softcap)

"""`sparsec::structured_linear`: S2FT-style structured fine-tuning of a linear layer.

A dense trainable `delta` covers selected output rows (`axis=0`, delta is s × in) or selected
input columns (`axis=1`, delta is out × s) of a frozen W; y = x (W + Δ)ᵀ + b. Attention heads
are blocks of rows of q/k/v or blocks of columns of o_proj; MLP channels are rows of up/gate or
columns of down. The gradient of `delta` is the selected slice of dW only,
`sparsec::structured_grad`: a sub-GEMM of size tokens × s × in (or tokens × out × s) instead of
tokens × out × in.
"""

from __future__ import annotations

import torch
from torch.library import custom_op

__all__ = ["structured_linear", "structured_grad", "structured_grad_input", "apply_structured",
           "structured_linear_ref", "structured_grad_ref"]


def apply_structured(weight: torch.Tensor, index: torch.Tensor, delta: torch.Tensor,
                     axis: int) -> torch.Tensor:
    """W + Δ as a new dense tensor: `delta` added to the rows (axis 0) or columns (axis 1)."""
    return weight.index_add(axis, index, delta.to(weight.dtype))


def structured_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          index: torch.Tensor, delta: torch.Tensor, axis: int) -> torch.Tensor:
    return torch.nn.functional.linear(x, apply_structured(weight, index, delta, axis), bias)


def structured_grad_ref(grad: torch.Tensor, x: torch.Tensor, index: torch.Tensor,
                        axis: int) -> torch.Tensor:
    g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    if axis == 0:
        return g2.index_select(1, index).t() @ x2
    return g2.t() @ x2.index_select(1, index)


def _check_axis(axis: int) -> None:
    if axis not in (0, 1):
        raise ValueError(f"structured axis must be 0 (rows) or 1 (columns), got {axis}")


@custom_op("sparsec::structured_grad", mutates_args=())
def structured_grad(grad: torch.Tensor, x: torch.Tensor, index: torch.Tensor,
                    axis: int) -> torch.Tensor:
    """The selected rows (axis 0) or columns (axis 1) of dW = gradᵀ·x, nothing else."""
    _check_axis(axis)
    return structured_grad_ref(grad, x, index, axis)


@structured_grad.register_fake
def _(grad, x, index, axis):
    s = index.shape[0]
    return grad.new_empty((s, x.shape[-1]) if axis == 0 else (grad.shape[-1], s))


@custom_op("sparsec::structured_grad_input", mutates_args=())
def structured_grad_input(grad: torch.Tensor, weight: torch.Tensor, index: torch.Tensor,
                          delta: torch.Tensor, axis: int) -> torch.Tensor:
    """grad · (W + Δ): the gradient of the layer's input."""
    return torch.matmul(grad, apply_structured(weight, index, delta, axis))


@structured_grad_input.register_fake
def _(grad, weight, index, delta, axis):
    return grad.new_empty(*grad.shape[:-1], weight.shape[1])


@custom_op("sparsec::structured_linear", mutates_args=())
def structured_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      index: torch.Tensor, delta: torch.Tensor, axis: int) -> torch.Tensor:
    """x (W + Δ)ᵀ + b with Δ dense on the selected rows or columns."""
    _check_axis(axis)
    return structured_linear_ref(x, weight, bias, index, delta, axis)


@structured_linear.register_fake
def _(x, weight, bias, index, delta, axis):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _setup(ctx, inputs, output):
    x, weight, bias, index, delta, axis = inputs
    ctx.save_for_backward(x, weight, index, delta)
    ctx.axis, ctx.has_bias = axis, bias is not None


def _backward(ctx, grad):
    x, weight, index, delta = ctx.saved_tensors
    need_x, need_w, need_b, _, need_d, _ = ctx.needs_input_grad
    gx = gw = gb = gd = None
    if need_x:
        gx = torch.ops.sparsec.structured_grad_input(grad, weight, index, delta, ctx.axis)
    if need_d:
        gd = torch.ops.sparsec.structured_grad(grad, x, index, ctx.axis).to(delta.dtype)
    if need_w:  # only when a user trains the base weight too: the dense gradient
        gw = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    if need_b and ctx.has_bias:
        gb = grad.reshape(-1, grad.shape[-1]).sum(0)
    return gx, gw, gb, None, gd, None


structured_linear.register_autograd(_backward, setup_context=_setup)

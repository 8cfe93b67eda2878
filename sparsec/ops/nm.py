"""`sparsec::nm_linear`: N:M sparse training with SR-STE.

The forward keeps the n largest |w| in every group of m consecutive weights along the input
dimension (`sparsec::nm_mask`) and computes y = x (W ⊙ mask)ᵀ + b. The backward is
straight-through: the dense W receives gᵀx, plus SR-STE's decayed term λ·(1 − mask) ⊙ W that
pulls pruned weights towards zero so the mask settles (Zhou et al., 2021,
"Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch").
After training, W ⊙ nm_mask(W) is exactly N:M.
"""

from __future__ import annotations

import importlib

import torch
from torch.library import custom_op

__all__ = ["nm_linear", "nm_mask", "nm_grad_input", "nm_grad_weight", "nm_mask_ref",
           "nm_linear_ref", "apply_nm"]


def nm_mask_ref(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask with exactly n True in each group of m along the last dim (largest |w|;
    among equal |w| the earlier element wins: a stable sort gives the same mask on every
    device, where topk's choice among ties is unspecified and differs between CPU and CUDA)."""
    out, inp = weight.shape
    groups = weight.detach().abs().reshape(out, inp // m, m)
    keep = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(out, inp)


def apply_nm(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """W ⊙ mask: the N:M weight the layer computes with (and exports)."""
    return weight * nm_mask_ref(weight, n, m)


def nm_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n: int,
                  m: int) -> torch.Tensor:
    return torch.nn.functional.linear(x, apply_nm(weight, n, m), bias)


def _check(weight: torch.Tensor, n: int, m: int) -> None:
    if not (0 < n <= m):
        raise ValueError(f"N:M sparsity needs 0 < n <= m, got {n}:{m}")
    if weight.dim() != 2 or weight.shape[1] % m:
        raise ValueError(f"N:M sparsity needs in_features divisible by m={m}, got "
                         f"{tuple(weight.shape)}")


@custom_op("sparsec::nm_mask", mutates_args=())
def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The N:M mask of `weight` (bool, same shape)."""
    _check(weight, n, m)
    return nm_mask_ref(weight, n, m)


@nm_mask.register_fake
def _(weight, n, m):
    return torch.empty_like(weight, dtype=torch.bool)


@custom_op("sparsec::nm_grad_input", mutates_args=())
def nm_grad_input(grad: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """grad · (W ⊙ mask): the gradient of the layer's input."""
    return torch.matmul(grad, weight * mask)


@nm_grad_input.register_fake
def _(grad, weight, mask):
    return grad.new_empty(*grad.shape[:-1], weight.shape[1])


@custom_op("sparsec::nm_grad_weight", mutates_args=())
def nm_grad_weight(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                   mask: torch.Tensor, decay: float) -> torch.Tensor:
    """SR-STE: gradᵀ·x for every weight (straight through) + decay · (1 − mask) ⊙ W."""
    dense = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    return dense + decay * weight * ~mask


@nm_grad_weight.register_fake
def _(grad, x, weight, mask, decay):
    return torch.empty_like(weight)


@custom_op("sparsec::nm_linear", mutates_args=())
def nm_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n: int, m: int,
              decay: float) -> torch.Tensor:
    """x (W ⊙ nm_mask(W))ᵀ + b; `decay` is SR-STE's λ, used by the backward."""
    _check(weight, n, m)
    return nm_linear_ref(x, weight, bias, n, m)


@nm_linear.register_fake
def _(x, weight, bias, n, m, decay):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _setup(ctx, inputs, output):
    x, weight, bias, n, m, decay = inputs
    ctx.save_for_backward(x, weight)
    ctx.n, ctx.m, ctx.decay, ctx.has_bias = n, m, decay, bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    gx = gw = gb = None
    if need_x or need_w:  # recomputed rather than saved: a mask costs out × in bytes
        mask = torch.ops.sparsec.nm_mask(weight, ctx.n, ctx.m)
    if need_x:
        gx = torch.ops.sparsec.nm_grad_input(grad, weight, mask)
    if need_w:
        gw = torch.ops.sparsec.nm_grad_weight(grad, x, weight, mask, ctx.decay)
    if need_b and ctx.has_bias:
        gb = grad.reshape(-1, grad.shape[-1]).sum(0)
    return gx, gw, gb, None, None, None


nm_linear.register_autograd(_backward, setup_context=_setup)


# CUDA: the Triton kernels of sparsec.kernels.nm_mask (mask; mask and W ⊙ mask in one pass;
# SR-STE term in one pass after the GEMM) when Triton is installed, else the references above.
def _triton_module():
    try:
        mod = importlib.import_module("sparsec.kernels.nm_mask")
    except ImportError:
        return None
    return mod if mod.HAS_TRITON else None


@nm_mask.register_kernel("cuda")
def _(weight, n, m):
    _check(weight, n, m)
    mod = _triton_module()
    return mod.nm_mask(weight, n, m) if mod is not None else nm_mask_ref(weight, n, m)


@nm_linear.register_kernel("cuda")
def _(x, weight, bias, n, m, decay):
    _check(weight, n, m)
    mod = _triton_module()
    w = mod.nm_apply(weight, n, m) if mod is not None else apply_nm(weight, n, m)
    return torch.nn.functional.linear(x, w, bias)


@nm_grad_weight.register_kernel("cuda")
def _(grad, x, weight, mask, decay):
    dense = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    mod = _triton_module()
    if mod is None:
        return dense + decay * weight * ~mask
    return mod.nm_srste_(dense.contiguous(), weight, decay, mask=mask)

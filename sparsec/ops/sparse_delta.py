"""`sparsec::sparse_delta_linear`: y = x (W + Δ)ᵀ + b with a sparse trainable Δ.

Δ is given by flat int64 `indices` into W (sorted, unique) and trainable `values` of the same
length k. The frozen weight gets no gradient (unless it asks for one); `values` gets the
*sampled* product `sparsec::sampled_grad`: only the k entries of dW = gᵀx that Δ needs,
computed without the dense m×n gradient. Each backward piece is its own op, so a joint graph
(AOTAutograd) sees `sampled_grad` and `sparse_delta_grad_input` by name and can prune them.

On the CPU, `sampled_grad` runs torch's CSR SDDMM for float32/float64 and the chunked reference
otherwise. On CUDA it runs `sparsec.kernels.sparse_delta.sampled_grad` when Triton is
installed (a Triton sampled product or dense dW + gather, whichever is faster for the shape and
density, measured once), else the chunked reference.
"""

from __future__ import annotations

import importlib
import warnings

import torch
from torch.library import custom_op

__all__ = ["sparse_delta_linear", "sparse_delta_grad_input", "sampled_grad", "apply_delta",
           "sparse_delta_linear_ref", "sampled_grad_ref", "sampled_grad_csr",
           "SAMPLED_CHUNK_ELEMENTS"]

# Elements of the (tokens × chunk) gather buffers in sampled_grad_ref: bounds its memory.
SAMPLED_CHUNK_ELEMENTS = 1 << 22


def apply_delta(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """W + Δ as a new dense tensor (W is not modified)."""
    flat = weight.reshape(-1).index_add(0, indices, values.to(weight.dtype))
    return flat.view_as(weight)


def sparse_delta_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, apply_delta(weight, indices, values), bias)


def sampled_grad_ref(grad: torch.Tensor, x: torch.Tensor, indices: torch.Tensor,
                     in_features: int) -> torch.Tensor:
    """dW.flatten()[indices] for dW = gradᵀ x, in chunks of k: memory O(tokens × chunk)."""
    acc = torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else grad.dtype
    # Transposed copies make each gather below a contiguous row copy.
    gt = grad.reshape(-1, grad.shape[-1]).t().to(acc).contiguous()
    xt = x.reshape(-1, x.shape[-1]).t().to(acc).contiguous()
    tokens, k = gt.shape[1], indices.numel()
    out = torch.empty(k, dtype=acc, device=gt.device)
    chunk = max(1, SAMPLED_CHUNK_ELEMENTS // max(1, tokens))
    for start in range(0, k, chunk):
        idx = indices[start:start + chunk]
        out[start:start + chunk] = (gt[idx // in_features] * xt[idx % in_features]).sum(1)
    return out


def sampled_grad_csr(grad: torch.Tensor, x: torch.Tensor, indices: torch.Tensor,
                     in_features: int) -> torch.Tensor:
    """The same through torch's CSR SDDMM (`torch.sparse.sampled_addmm`): one dot product per
    entry, no gather buffers; several times faster than dense dW + gather on the CPU."""
    g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    rows_n = g2.shape[1]
    counts = torch.bincount(indices // in_features, minlength=rows_n)
    crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    with warnings.catch_warnings():  # "CSR support is in beta": it is exact here, say nothing
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, indices % in_features,
                                          g2.new_zeros(indices.numel()), (rows_n, in_features))
        return torch.sparse.sampled_addmm(pattern, g2.t(), x2, beta=0.0).values()


@custom_op("sparsec::sampled_grad", mutates_args=())
def sampled_grad(grad: torch.Tensor, x: torch.Tensor, indices: torch.Tensor,
                 in_features: int) -> torch.Tensor:
    """The k entries of gradᵀ·x at flat `indices` (sorted) of an (out, in_features) matrix."""
    if grad.device.type == "cpu" and grad.dtype in (torch.float32, torch.float64) \
            and indices.numel() and grad.numel():
        return sampled_grad_csr(grad, x, indices, in_features)
    return sampled_grad_ref(grad, x, indices, in_features).to(grad.dtype)


@sampled_grad.register_fake
def _(grad, x, indices, in_features):
    return grad.new_empty(indices.shape)


def _triton_module():
    """sparsec.kernels.sparse_delta if Triton is installed, else None (looked up per call, so
    importing sparsec never imports Triton)."""
    try:
        mod = importlib.import_module("sparsec.kernels.sparse_delta")
    except ImportError:
        return None
    return mod if mod.HAS_TRITON else None


@sampled_grad.register_kernel("cuda")
def _(grad, x, indices, in_features):
    mod = _triton_module()
    if mod is None:
        return sampled_grad_ref(grad, x, indices, in_features).to(grad.dtype)
    return mod.sampled_grad(grad, x, indices, in_features).to(grad.dtype)


@custom_op("sparsec::sparse_delta_grad_input", mutates_args=())
def sparse_delta_grad_input(grad: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor,
                            values: torch.Tensor) -> torch.Tensor:
    """grad · (W + Δ): the gradient of the layer's input."""
    return torch.matmul(grad, apply_delta(weight, indices, values))


@sparse_delta_grad_input.register_fake
def _(grad, weight, indices, values):
    return grad.new_empty(*grad.shape[:-1], weight.shape[1])


@custom_op("sparsec::sparse_delta_linear", mutates_args=())
def sparse_delta_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """x (W + Δ)ᵀ + b, Δ = scatter(values at flat indices)."""
    return sparse_delta_linear_ref(x, weight, bias, indices, values)


@sparse_delta_linear.register_fake
def _(x, weight, bias, indices, values):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _setup(ctx, inputs, output):
    x, weight, bias, indices, values = inputs
    ctx.save_for_backward(x, weight, indices, values)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight, indices, values = ctx.saved_tensors
    need_x, need_w, need_b, _, need_v = ctx.needs_input_grad
    gx = gw = gb = gv = None
    if need_x:
        gx = torch.ops.sparsec.sparse_delta_grad_input(grad, weight, indices, values)
    if need_v:
        gv = torch.ops.sparsec.sampled_grad(grad, x, indices, weight.shape[1]).to(values.dtype)
    if need_w:  # only when a user trains the base weight too: the dense gradient
        gw = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    if need_b and ctx.has_bias:
        gb = grad.reshape(-1, grad.shape[-1]).sum(0)
    return gx, gw, gb, None, gv


sparse_delta_linear.register_autograd(_backward, setup_context=_setup)

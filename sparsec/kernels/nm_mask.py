"""N:M sparsity on Triton: the mask (top-n |w| in every group of m along the input dim) and the
SR-STE gradient term, each in one pass over the weight.

One kernel, three modes (a BR × BC tile of W per program; groups never straddle tiles):
- mask: bool mask, n True per group;
- apply: W ⊙ mask (the weight `nm_linear`'s forward multiplies with);
- sr-ste: out = dW + λ·(1 − mask) ⊙ W, in place on the dense gradient dW (mask given, or
  computed from W in the same pass).
Ties are broken by position: among equal |w| the earlier element wins (a stable descending
sort), which `nm_mask_ref` states in plain torch. The rank of each element inside its group is
counted with an m × m comparison, so m must be a power of two (2, 4, 8, 16, 32); other m use
the reference.
"""

import torch

from ._triton import HAS_TRITON, cdiv, on_cuda, tl, triton

__all__ = ["HAS_TRITON", "nm_mask_ref", "srste_ref", "nm_mask", "nm_apply", "nm_srste_"]


def nm_mask_ref(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """bool mask with exactly n True in each group of m along the last dim: the n largest |w|,
    ties to the earlier element."""
    out, inp = weight.shape
    groups = weight.detach().abs().reshape(out, inp // m, m)
    keep = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(out, inp)


def srste_ref(dense: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
              decay: float) -> torch.Tensor:
    """SR-STE's weight gradient: the straight-through dW plus λ·(1 − mask) ⊙ W."""
    return dense + decay * weight * ~mask


_MASK, _APPLY, _SRSTE = 0, 1, 2


@triton.jit
def _nm_kernel(W, MaskIn, Dst, MaskOut, R, C, swr, swc, decay,
               N: tl.constexpr, M: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
               MODE: tl.constexpr, HAS_MASK: tl.constexpr, STORE_MASK: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    inside = (rows[:, None] < R) & (cols[None, :] < C)
    w = tl.load(W + rows[:, None].to(tl.int64) * swr + cols[None, :] * swc, mask=inside,
                other=0.0)
    flat = rows[:, None].to(tl.int64) * C + cols[None, :]          # contiguous outputs
    if HAS_MASK:
        keep = tl.load(MaskIn + flat, mask=inside, other=0) != 0
    else:
        a = tl.reshape(tl.abs(w.to(tl.float32)), [BR * BC // M, M])
        pos = tl.arange(0, M)
        ai = a[:, :, None]
        aj = a[:, None, :]
        before = (aj > ai) | ((aj == ai) & (pos[None, None, :] < pos[None, :, None]))
        rank = tl.sum(before.to(tl.int32), 2)
        keep = tl.reshape(rank < N, [BR, BC])
    if STORE_MASK:
        tl.store(MaskOut + flat, keep.to(tl.int8), mask=inside)
    if MODE == 1:
        tl.store(Dst + flat, tl.where(keep, w, 0.0).to(Dst.dtype.element_ty), mask=inside)
    if MODE == 2:
        d = tl.load(Dst + flat, mask=inside, other=0.0).to(tl.float32)
        d = d + tl.where(keep, 0.0, decay * w.to(tl.float32))
        tl.store(Dst + flat, d.to(Dst.dtype.element_ty), mask=inside)


def _usable(weight: torch.Tensor, m: int | None) -> bool:
    """The kernel takes 2-D float16/bfloat16/float32 weights on CUDA (or any under the
    interpreter); computing a mask needs m a power of two in [2, 32] (m None: mask given)."""
    ok = (on_cuda(weight) and weight.dim() == 2 and
          weight.dtype in (torch.float16, torch.bfloat16, torch.float32))
    return ok and (m is None or (m & (m - 1) == 0 and 2 <= m <= 32))


def _launch(weight, n, m, mode, dst=None, mask_in=None, decay=0.0, store_mask=False):
    r, c = weight.shape
    mask_out = torch.empty(r, c, dtype=torch.bool, device=weight.device) if store_mask else None
    bc = max(m, 64)
    br = max(1, 4096 // (bc * m)) if mask_in is None else 32  # the m×m ranks stay in registers
    dummy = weight
    _nm_kernel[(cdiv(r, br), cdiv(c, bc))](
        weight, dummy if mask_in is None else mask_in.view(torch.uint8),
        dummy if dst is None else dst,
        dummy if mask_out is None else mask_out.view(torch.uint8), r, c, *weight.stride(),
        float(decay), N=n, M=m, BR=br, BC=bc, MODE=mode, HAS_MASK=mask_in is not None,
        STORE_MASK=store_mask, num_warps=4)
    return mask_out


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """`sparsec::nm_mask` on the device (ties to the earlier element)."""
    if not _usable(weight, m):
        return nm_mask_ref(weight, n, m)
    return _launch(weight.detach(), n, m, _MASK, store_mask=True)


def nm_apply(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """W ⊙ nm_mask(W) in one pass (the forward's weight)."""
    if not _usable(weight, m):
        return weight * nm_mask_ref(weight, n, m)
    out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    _launch(weight.detach(), n, m, _APPLY, dst=out)
    return out


def nm_srste_(dense: torch.Tensor, weight: torch.Tensor, decay: float, *, n: int = 0,
              m: int = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """dense += λ·(1 − mask) ⊙ W in place and return it; the mask is `mask` or computed from
    W (n:m) in the same pass. `dense` must be contiguous with W's shape."""
    if not _usable(weight, m if mask is None else None):
        keep = mask if mask is not None else nm_mask_ref(weight, n, m)
        return dense.add_(decay * weight * ~keep)
    if not dense.is_contiguous() or dense.shape != weight.shape:
        raise ValueError("nm_srste_ needs a contiguous dense gradient of the weight's shape")
    _launch(weight.detach(), n, max(m, 2), _SRSTE, dst=dense, decay=decay,
            mask_in=None if mask is None else mask.contiguous())
    return dense

"""How sparsec compares outputs with a reference: `compare_outputs` (max absolute, max
relative and normwise errors, non-finite values sound) and `tolerance` (by the lowest
precision). Every verification, parity check and gradient check uses these two."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .errors import VerificationError

__all__ = ["compare_outputs", "tolerance", "L2_FLOOR"]


def compare_outputs(got: Any, expected: Any) -> dict[str, float]:
    """Errors over all tensors: the max absolute error, the max relative error (to the largest
    finite reference magnitude of each tensor) and the normwise relative error
    ‖a − b‖₂ / ‖b‖₂ (the worst tensor).

    The normwise error of a tensor far smaller than the rest is taken against a floor instead
    of its own norm: `L2_FLOOR` times the root mean square of all reference values, per entry.
    Such a tensor can be pure rounding noise of cancelled terms (the gradient of an attention
    key's bias is exactly zero, since softmax ignores a shift shared by a row; in bfloat16 it
    comes out at about 0.1 % of a step's RMS), and its own relative error would say nothing.

    Non-finite values: a position where both sides hold the same non-finite value (both NaN,
    or an infinity of the same sign) counts as equal; any other position where either side is
    NaN or infinite is an infinite error, so verification and parity fail on it.
    """
    a, spec_a = pytree.tree_flatten(got)
    b, spec_b = pytree.tree_flatten(expected)
    if len(a) != len(b):
        raise VerificationError(f"output structure changed: {spec_a} vs {spec_b}")
    abs_err = rel_err = 0.0
    norms = []  # (‖a − b‖, ‖b‖, numel) of each floating tensor
    for x, y in zip(a, b):
        if not isinstance(y, torch.Tensor):
            continue
        if not isinstance(x, torch.Tensor) or x.shape != y.shape:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise VerificationError(f"output shape changed: {shape} vs {tuple(y.shape)}")
        if not y.is_floating_point():
            bad = float((x != y).any())
            abs_err, rel_err = max(abs_err, bad), max(rel_err, bad)
            continue
        d, rel, diff_norm, ref_norm = _tensor_errors(x.double(), y.double())
        abs_err, rel_err = max(abs_err, d), max(rel_err, rel)
        norms.append((diff_norm, ref_norm, y.numel()))
    return {"max_abs_err": abs_err, "max_rel_err": rel_err, "rel_l2_err": _worst_l2(norms)}


L2_FLOOR = 0.1


def _worst_l2(norms: list[tuple[float, float, int]]) -> float:
    """The largest normwise relative error, each tensor's norm floored as `compare_outputs`
    says."""
    total = sum(n for _, _, n in norms)
    rms = math.sqrt(sum(r * r for _, r, _ in norms) / total) if total else 0.0
    return max((d / max(r, L2_FLOOR * rms * math.sqrt(n), 1e-30) for d, r, n in norms),
               default=0.0)


def _tensor_errors(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float, float]:
    """(max abs, max rel, ‖x − y‖, ‖y‖) of one float64 pair, non-finite values as documented
    in `compare_outputs`."""
    if not x.numel():
        return 0.0, 0.0, 0.0, 0.0
    finite = torch.isfinite(x) & torch.isfinite(y)
    same = (x == y) | (torch.isnan(x) & torch.isnan(y))  # same inf, or NaN at the same place
    if bool((~finite & ~same).any()):
        return math.inf, math.inf, math.inf, 0.0
    diff = torch.where(finite, (x - y).abs(), torch.zeros_like(x))
    ref = torch.where(finite, y, torch.zeros_like(y))
    d = float(diff.max())
    scale = float(ref.abs().max())
    return (d, d / max(scale, 1e-12), float(torch.linalg.vector_norm(diff)),
            float(torch.linalg.vector_norm(ref)))


def tolerance(outputs: Any, rtol_float32: float) -> float:
    """The relative tolerance for the lowest-precision floating output."""
    dtypes = {t.dtype for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)}
    if dtypes & {torch.float16, torch.bfloat16}:
        return max(rtol_float32, 2e-2)
    if torch.float64 in dtypes and torch.float32 not in dtypes:
        return rtol_float32 * 1e-3
    return rtol_float32

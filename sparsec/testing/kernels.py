"""Helpers for testing Triton kernels against their references (used by tests/kernels).

- `kernel_device()`: "cuda" where a GPU is present, else "cpu" (kernels then run under
  Triton's interpreter, which tests/kernels/conftest.py switches on before Triton loads them);
- `rel_err(out, ref)`: ‖out − ref‖ / ‖ref‖ in float64 (NaN if out has a NaN, so it never passes);
- `poisoned()`: a context in which every kernel output buffer starts as NaN (floats) or −7
  (integers), so an element a kernel forgets to write fails the comparison;
- `TOL`: relative tolerances by input dtype (float32 kernels use IEEE dots).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["kernel_device", "rel_err", "poisoned", "TOL"]

TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def kernel_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("nan")
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


@contextlib.contextmanager
def poisoned() -> Iterator[None]:
    from sparsec.kernels import _attention_common as common

    real = common.empty

    def empty(*shape, dtype, device):
        t = real(*shape, dtype=dtype, device=device)
        return t.fill_(float("nan") if dtype.is_floating_point else -7)

    common.empty = empty
    try:
        yield
    finally:
        common.empty = real

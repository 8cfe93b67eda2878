"""Helpers for sparsec's ONNX translations (onnxscript, traced by `torch.onnx.export`).

The exporter calls a translation with its tensor inputs as symbolic values whose shapes and
dtypes are known, and its attributes as Python values. Values made inside a translation carry
no shape, so every static size below is computed in Python from the inputs' shapes. Batch
dimensions may be symbolic (`str`/`SymbolicDim` in the shape): those are never read as ints.

Imported only by the onnx backend (onnxscript is not needed to import sparsec).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
from onnxscript import ir
from onnxscript import opset18 as op

__all__ = ["op", "ir", "const", "ints", "static_dims", "is_static", "work_type", "cast_to",
           "batch_range", "ExportContext", "export_context", "current_context", "NEG_INF"]

NEG_INF = float("-inf")


def const(value: Any, dtype: Any = None):
    """A Constant node holding `value` (a number or array) as `dtype` (numpy)."""
    return op.Constant(value=ir.tensor(np.asarray(value, dtype=dtype)))


def ints(*values: int):
    """A 1-D int64 Constant (shapes, axes, pads)."""
    return op.Constant(value_ints=[int(v) for v in values])


def is_static(dim: Any) -> bool:
    return isinstance(dim, int)


def static_dims(value: Any) -> list[Any]:
    """The input's dims: ints where static, the symbolic dim otherwise."""
    shape = value.shape
    if shape is None:
        raise ValueError(f"ONNX translation: input {value.name} has no shape")
    return [d if isinstance(d, int) else getattr(d, "value", d) for d in shape]


def work_type(dtype: ir.DataType) -> ir.DataType:
    """The dtype attention computes in: float64 stays, everything else is float32 (as the op)."""
    return ir.DataType.DOUBLE if dtype == ir.DataType.DOUBLE else ir.DataType.FLOAT


def cast_to(value: Any, dtype: ir.DataType):
    return value if value.dtype == dtype else op.Cast(value, to=dtype)


def np_type(dtype: ir.DataType):
    return np.float64 if dtype == ir.DataType.DOUBLE else np.float32


def batch_range(like: Any, stride: int, rank: int):
    """int64 [B, 1, ..., 1] (rank dims) holding b * stride, B = like.shape[0] (may be symbolic)."""
    b = op.Squeeze(op.Shape(like, start=0, end=1), ints(0))
    r = op.Range(const(0, np.int64), b, const(1, np.int64))
    r = op.Mul(r, const(stride, np.int64)) if stride != 1 else r
    return op.Reshape(r, ints(-1, *([1] * (rank - 1))))


@dataclass
class ExportContext:
    """What the onnx backend asks of the translations during one export, and what they did.

    `attention`: "auto" | "gathered" | "dense" | "contrib"; `provider`: "cpu" | "cuda".
    Translations append one entry per attention site to `sites` (in graph order) and may read
    `hints` (same order).
    """

    attention: str = "auto"
    provider: str = "cpu"
    sites: list[dict[str, Any]] = field(default_factory=list)
    hints: list[dict[str, Any]] = field(default_factory=list)  # per site, from the backend

    def hint(self, index: int) -> dict[str, Any]:
        """What the backend found out about site `index` from the program (e.g. that a static
        layout leaves no query row empty), or {}."""
        return self.hints[index] if index < len(self.hints) else {}


_CONTEXT: contextvars.ContextVar[ExportContext | None] = contextvars.ContextVar(
    "sparsec_onnx_export", default=None)


@contextlib.contextmanager
def export_context(ctx: ExportContext) -> Iterator[ExportContext]:
    token = _CONTEXT.set(ctx)
    try:
        yield ctx
    finally:
        _CONTEXT.reset(token)


def current_context() -> ExportContext:
    """The backend's context, or the defaults (gathered on the CPU) outside one."""
    return _CONTEXT.get() or ExportContext()

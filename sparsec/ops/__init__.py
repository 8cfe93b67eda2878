"""sparsec's custom ops, `torch.ops.sparsec.*`.

Each op module keeps four parts together: the plain-torch reference (the numerics oracle and
the CPU path), the dispatch to a Triton kernel on CUDA, the fake implementation (so
torch.export and AOTAutograd see shapes) and the ONNX translation, registered here with
`onnx_translation` so the onnx backend finds it.
"""

from __future__ import annotations

import importlib
from typing import Callable

__all__ = ["onnx_translation", "onnx_translations", "OP_MODULES", "load_ops"]

# Op modules imported (and so registered) with sparsec.ops.
OP_MODULES: tuple[str, ...] = ("block_sparse_attention", "block_select", "sparse_delta",
                               "structured", "nm")

_ONNX: dict[object, Callable] = {}


def onnx_translation(op: object) -> Callable[[Callable], Callable]:
    """Decorator: register an onnxscript function as the ONNX translation of `op`."""
    def deco(fn: Callable) -> Callable:
        _ONNX[op] = fn
        return fn
    return deco


def load_ops() -> None:
    """Import every op module, registering `torch.ops.sparsec.*` (idempotent)."""
    for name in OP_MODULES:
        importlib.import_module(f"{__name__}.{name}")


def onnx_translations() -> dict[object, Callable]:
    """The custom translation table for `torch.onnx.export(dynamo=True)`."""
    load_ops()
    return dict(_ONNX)


load_ops()

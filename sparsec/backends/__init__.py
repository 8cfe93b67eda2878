"""Backends: each `lower(program, options) -> Compiled`."""

from __future__ import annotations

import importlib

from ..errors import BadInputError
from ..program import Program
from .base import Compiled, LowerOptions

__all__ = ["BACKENDS", "lower", "Compiled", "LowerOptions"]

BACKENDS = ("eager", "onnx", "triton")


def lower(program: Program, backend: str = "eager",
          options: LowerOptions | None = None) -> Compiled:
    """Lower `program` with the named backend."""
    if backend not in BACKENDS:
        raise BadInputError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    module = importlib.import_module(f"{__name__}.{backend}")
    return module.lower(program, options or LowerOptions())

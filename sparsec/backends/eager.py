"""The eager backend: run the transformed GraphModule as it is (ops take their default path)."""

from __future__ import annotations

from ..program import Program
from .base import Compiled, LowerOptions

__all__ = ["lower"]


def lower(program: Program, options: LowerOptions | None = None) -> Compiled:
    return Compiled(program=program, backend="eager", fn=program.gm)

"""The eager backend: run the transformed GraphModule as it is (ops take their default path)."""

from __future__ import annotations

from ..program import Program
from .base import Compiled, LowerOptions

__all__ = ["lower"]


def lower(program: Program, options: LowerOptions | None = None) -> Compiled:
    options = options or LowerOptions()
    compiled = Compiled(program=program, backend="eager", fn=program.gm)
    if program.is_training_step and options.verify:
        from ..joint import step_report

        compiled.report.update(step_report(program))
    return compiled

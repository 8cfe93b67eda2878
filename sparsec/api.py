"""The one-call Python API: `sparsec.compile` (trace, passes, lowering, outputs written)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from .backends import Compiled, LowerOptions, lower
from .errors import BadInputError
from .frontend import trace
from .outputs import check_dump_dir, check_output_dir, staged_output, write_outputs
from .passes.base import Pass
from .pipeline import run_passes
from .program import Program
from .recipe import resolve_passes
from .report import build_report

__all__ = ["compile"]


def compile(model: torch.nn.Module | Program | str | Path, example_inputs: Any = None, *,
            passes: Sequence[Pass | str] = (), recipe: str | Path | None = None,
            backend: str = "eager", out_dir: str | Path | None = None, verify: bool = True,
            dump_dir: str | Path | None = None, force: bool = False,
            backend_options: dict[str, Any] | None = None,
            deltas: str | Path | None = None, partial_deltas: bool = False,
            source: Any = None) -> Compiled:
    """Trace (unless given a Program), run the recipe's passes then `passes`, and lower.

    `model` may be an `nn.Module` (with `example_inputs`), a traced `Program`, or the path of a
    `model.py`. With `out_dir`, artifacts and report.json are written there atomically. With
    `deltas` (a file from `sparsec train`), the trained deltas are put into the program's sparse
    fine-tuning ops before lowering; the onnx backend exports them merged into dense weights.
    Every fine-tuned weight must have its delta unless `partial_deltas`.
    `model` may also be an HF checkpoint directory; `source` (`sparsec.sources.SourceOptions`)
    sets its task and input shape.
    """
    pass_list = resolve_passes(recipe, passes)
    if isinstance(model, Program):
        program = model
    elif isinstance(model, (str, Path)):
        from .sources import open_model

        program = open_model(model, source).program
    else:
        if example_inputs is None:
            raise BadInputError("compile() needs example_inputs with an nn.Module")
        program = trace(model, example_inputs)
    inputs = [model if isinstance(model, (str, Path)) else None, recipe, deltas]
    check_dump_dir(dump_dir, out_dir)
    if out_dir is not None:  # fail before the work
        check_output_dir(out_dir, force=force, inputs=inputs)
    program = run_passes(program, pass_list, verify=verify, dump_dir=dump_dir)
    if deltas is not None:
        _load_deltas(program, deltas, partial_deltas)
    options = LowerOptions(verify=verify, extra=backend_options or {})
    if out_dir is None:
        compiled = lower(program, backend, options)
        compiled.summary = build_report(compiled)
        return compiled
    with staged_output(out_dir, force=force, inputs=inputs) as staging:
        options.out_dir = staging
        compiled = lower(program, backend, options)
        compiled.summary = write_outputs(compiled, staging, pass_list)
    final = Path(out_dir)
    compiled.artifacts = {k: final / v.name for k, v in compiled.artifacts.items()}
    return compiled


def _load_deltas(program: Program, path: str | Path, partial: bool = False) -> None:
    from .training.deltas import apply_deltas, load_deltas

    d = load_deltas(path, base=program)
    apply_deltas(program, d, partial=partial)
    program.state.setdefault("report", {})["deltas"] = {
        "file": str(path), "targets": len(d.targets), "methods": d.methods, "info": d.info}



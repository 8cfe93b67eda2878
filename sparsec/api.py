"""The one-call Python API: `sparsec.compile`, and safe output directories."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ._util import atomic_write_text
from .backends import Compiled, LowerOptions, lower
from .errors import BadInputError, RecipeError
from .frontend import trace
from .passes.base import Pass
from .pipeline import run_passes
from .program import Program
from .recipe import dump_recipe, load_recipe, parse_pass_arg
from .report import build_report, to_json

__all__ = ["compile", "resolve_passes", "staged_output", "write_outputs"]


def compile(model: torch.nn.Module | Program | str | Path, example_inputs: Any = None, *,
            passes: Sequence[Pass | str] = (), recipe: str | Path | None = None,
            backend: str = "eager", out_dir: str | Path | None = None, verify: bool = True,
            dump_dir: str | Path | None = None, force: bool = False,
            backend_options: dict[str, Any] | None = None,
            deltas: str | Path | None = None, source: Any = None) -> Compiled:
    """Trace (unless given a Program), run the recipe's passes then `passes`, and lower.

    `model` may be an `nn.Module` (with `example_inputs`), a traced `Program`, or the path of a
    `model.py`. With `out_dir`, artifacts and report.json are written there atomically. With
    `deltas` (a file from `sparsec train`), the trained deltas are put into the program's sparse
    fine-tuning ops before lowering; the onnx backend exports them merged into dense weights.
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
    if out_dir is not None and Path(out_dir).exists() and not force:  # fail before the work
        raise BadInputError(f"{out_dir}: output directory exists; pass --force to replace it")
    program = run_passes(program, pass_list, verify=verify, dump_dir=dump_dir)
    if deltas is not None:
        _load_deltas(program, deltas)
    options = LowerOptions(verify=verify, extra=backend_options or {})
    if out_dir is None:
        compiled = lower(program, backend, options)
        compiled.summary = build_report(compiled)
        return compiled
    with staged_output(out_dir, force=force) as staging:
        options.out_dir = staging
        compiled = lower(program, backend, options)
        compiled.summary = write_outputs(compiled, staging, pass_list)
    final = Path(out_dir)
    compiled.artifacts = {k: final / v.name for k, v in compiled.artifacts.items()}
    return compiled


def _load_deltas(program: Program, path: str | Path) -> None:
    from .deltas import apply_deltas, load_deltas

    d = load_deltas(path, base=program)
    apply_deltas(program, d)
    program.state.setdefault("report", {})["deltas"] = {
        "file": str(path), "targets": len(d.targets), "methods": d.methods, "info": d.info}


def resolve_passes(recipe: str | Path | None, passes: Sequence[Pass | str]) -> list[Pass]:
    """The recipe's passes followed by `passes` (Pass objects or `NAME[:k=v,...]` strings)."""
    out = load_recipe(recipe) if recipe is not None else []
    for p in passes:
        if isinstance(p, Pass):
            out.append(p)
        elif isinstance(p, str):
            out.append(parse_pass_arg(p))
        else:
            raise RecipeError(f"passes must be Pass objects or 'name:k=v' strings, got {p!r}")
    return out


def write_outputs(compiled: Compiled, out_dir: Path, passes: Sequence[Pass]) -> dict[str, Any]:
    """Write recipe.toml and report.json beside the backend's artifacts; return the report."""
    atomic_write_text(out_dir / "recipe.toml", dump_recipe(passes))
    compiled.artifacts["recipe.toml"] = out_dir / "recipe.toml"
    report = build_report(compiled, artifacts=["report.json"])
    atomic_write_text(out_dir / "report.json", to_json(report))
    compiled.artifacts["report.json"] = out_dir / "report.json"
    return report


@contextlib.contextmanager
def staged_output(out_dir: str | Path, *, force: bool = False) -> Iterator[Path]:
    """A staging directory that becomes `out_dir` only if the block succeeds.

    An existing `out_dir` is refused unless `force`; then it is replaced in one rename, so a
    failure at any point leaves either the old directory or nothing, never half an output.
    """
    final = Path(out_dir)
    if final.exists() and not force:
        raise BadInputError(f"{final}: output directory exists; pass --force to replace it")
    if final.exists() and not final.is_dir():
        raise BadInputError(f"{final}: exists and is not a directory; choose another -o")
    parent = final.parent if str(final.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = parent / f".{final.name}.sparsec-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
    except OSError as e:
        raise BadInputError(f"{final}: cannot create the output directory ({e.strerror}); "
                            "check the path and its permissions") from e
    try:
        yield staging
        _swap_in(staging, final)
    except OSError as e:  # disk full, permissions, quota: the user's environment
        shutil.rmtree(staging, ignore_errors=True)
        raise BadInputError(f"{final}: writing the output failed ({e.strerror or e}); nothing "
                            "was written: free space or choose another -o") from e
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_in(staging: Path, final: Path) -> None:
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    try:
        os.replace(staging, final)
    except OSError:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

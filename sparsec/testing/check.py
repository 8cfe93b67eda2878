"""`check_pass`: run one pass through the pipeline and assert what every pass must satisfy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..frontend import trace
from ..passes.base import Pass
from ..pipeline import compare_outputs, run_passes, tolerance
from ..program import Program

__all__ = ["check_pass", "PassCheck"]


@dataclass
class PassCheck:
    """What `check_pass` saw: the program after the pass, and its verification errors."""

    program: Program
    max_abs_err: float
    max_rel_err: float
    modified: bool
    stats: dict[str, Any]


def check_pass(pass_: Pass, model: torch.nn.Module | Program, inputs: tuple | None = None, *,
               reference: Callable[..., Any] | None = None, atol: float | None = None,
               rtol: float | None = None, idempotent: bool = True) -> PassCheck:
    """Trace `model`, run `pass_` and assert:

    - the graph lints and the pipeline's verification passes (numerics equal the program
      before the pass, or the pass's stated reference);
    - with `reference` (a callable on the inputs), the outputs also equal it within
      `atol`/`rtol` (default: the dtype's tolerance);
    - the props the pass declares hold afterwards;
    - running the pass again modifies nothing (unless `idempotent=False`).
    """
    program = model if isinstance(model, Program) else trace(model, inputs)
    inputs = program.example_inputs
    after = run_passes(program, [pass_], verify=True)
    record = after.history[-1]
    missing = set(pass_.establishes) - after.props
    assert not missing, f"{pass_.name} declares {sorted(missing)} but they do not hold"
    err = dict(record.verify or {})
    if reference is not None:
        with torch.no_grad():
            got, want = after.gm(*inputs), reference(*inputs)
        err = compare_outputs(got, want)
        tol = rtol if rtol is not None else tolerance(got, pass_.rtol)
        ok = err["max_rel_err"] <= tol or (atol is not None and err["max_abs_err"] <= atol)
        assert ok, (f"{pass_.name}: outputs differ from the reference: max rel err "
                    f"{err['max_rel_err']:.3g} > {tol:.3g}, max abs err {err['max_abs_err']:.3g}")
    if idempotent:
        code = after.gm.code
        again = run_passes(after, [pass_], verify=True)
        assert not again.history[-1].modified, f"{pass_.name} is not idempotent: a second run " \
            f"modified the program ({again.history[-1].stats})"
        assert again.gm.code == code, f"{pass_.name}: a second run changed the graph"
    return PassCheck(after, err.get("max_abs_err", 0.0), err.get("max_rel_err", 0.0),
                     record.modified, record.stats)

"""`check_pass` and `assert_pass_preserves`: what every pass must satisfy, on one model or on
every model hypothesis can draw."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from hypothesis import given
from hypothesis import strategies as st

from ..errors import SparsecError
from ..frontend import trace
from ..passes.base import Pass
from ..pipeline import compare_outputs, run_passes, tolerance
from ..program import ModelSource, Program, Prop

__all__ = ["check_pass", "PassCheck", "PassPropertyError", "assert_pass_preserves"]


@dataclass
class PassCheck:
    """What `check_pass` saw: the program after the pass, and its verification errors."""

    program: Program
    max_abs_err: float
    max_rel_err: float
    modified: bool
    stats: dict[str, Any]


class PassPropertyError(AssertionError):
    """A pass broke a property on a drawn model; the message holds a runnable snippet."""


def check_pass(pass_: Pass, model: torch.nn.Module | Program, inputs: tuple | None = None, *,
               reference: Callable[..., Any] | None = None, atol: float | None = None,
               rtol: float | None = None, idempotent: bool = True, before: Sequence[Pass] = (),
               onnx: bool = False, loss: Callable[[Any, Any], torch.Tensor] | None = None
               ) -> PassCheck:
    """Trace `model`, run `before` then `pass_`, and assert:

    - the graph lints and the pipeline's verification passes (numerics equal the program
      before the pass, or the pass's stated reference);
    - with `reference` (a callable on the inputs), the outputs also equal it within
      `atol`/`rtol` (default: the dtype's tolerance);
    - the props the pass declares hold afterwards;
    - running the pass again modifies nothing (unless `idempotent=False`);
    - with `onnx`, the program exports and runs in onnxruntime with parity (forward programs
      of passes that declare themselves exportable).

    `loss(output, batch)` is attached to a traced model for joint-graph passes.
    """
    program = model if isinstance(model, Program) else trace(model, inputs)
    if loss is not None:
        program.source = ModelSource(name=program.source.name, loss=loss)
    if before:
        program = run_passes(program, list(before), verify=True)
    after = run_passes(program, [pass_], verify=True)
    record = after.history[-1]
    missing = set(pass_.establishes) - after.props
    assert not missing, f"{pass_.name} declares {sorted(missing)} but they do not hold"
    err = dict(record.verify or {})
    if reference is not None:
        err = _check_reference(pass_, after, reference, atol, rtol)
    if idempotent:
        _check_idempotent(pass_, after)
    if onnx and pass_.exportable and Prop.FORWARD_GRAPH in after.props:
        _check_onnx(after)
    return PassCheck(after, err.get("max_abs_err", 0.0), err.get("max_rel_err", 0.0),
                     record.modified, record.stats)


def _check_reference(pass_: Pass, after: Program, reference: Callable[..., Any],
                     atol: float | None, rtol: float | None) -> dict[str, float]:
    inputs = after.example_inputs
    with torch.no_grad():
        got, want = after.gm(*inputs), reference(*inputs)
    err = compare_outputs(got, want)
    tol = rtol if rtol is not None else tolerance(got, pass_.rtol)
    ok = err["max_rel_err"] <= tol or (atol is not None and err["max_abs_err"] <= atol)
    assert ok, (f"{pass_.name}: outputs differ from the reference: max rel err "
                f"{err['max_rel_err']:.3g} > {tol:.3g}, max abs err {err['max_abs_err']:.3g}")
    return err


def _check_idempotent(pass_: Pass, after: Program) -> None:
    code = after.gm.code
    again = run_passes(after, [pass_], verify=True)
    assert not again.history[-1].modified, (
        f"{pass_.name} is not idempotent: a second run modified the program "
        f"({again.history[-1].stats})")
    assert again.gm.code == code, f"{pass_.name}: a second run changed the graph"


def _check_onnx(program: Program) -> None:
    from ..backends import LowerOptions, lower

    lower(program, "onnx", LowerOptions(verify=True))  # raises ParityError when off


# hypothesis wrapper ----------------------------------------------------------------------------
def assert_pass_preserves(pass_: Pass, strategy: st.SearchStrategy | None = None, *,
                          settings: Any = None, **check_kwargs: Any) -> None:
    """Run `check_pass` on models drawn from `strategy` (default: `strategies.models()`).

    On failure hypothesis shrinks the model to a minimal one, and the error raised is a
    `PassPropertyError` whose message holds Python that rebuilds that model and its inputs
    (paste it into a regression test). `settings` is a `hypothesis.settings` (default: the
    active profile without a deadline and without the too-slow health checks, since every
    example compiles a graph: this works in a plain script as under pytest).
    """
    from . import strategies

    strategy = strategy if strategy is not None else strategies.models()

    def prop(model) -> None:
        try:
            check_pass(pass_, model, strategies.inputs_for(model), **check_kwargs)
        except (AssertionError, SparsecError) as e:
            snippet = model.snippet() if hasattr(model, "snippet") else repr(model)
            raise PassPropertyError(
                f"pass '{pass_.name}' broke on this model:\n\n{snippet}\n"
                f"{type(e).__name__}: {e}") from e

    test = given(strategy)(prop)
    test = (settings if settings is not None else _unhurried())(test)
    test()


def _unhurried() -> Any:
    from hypothesis import HealthCheck
    from hypothesis import settings as hypothesis_settings

    slow = [HealthCheck.too_slow, HealthCheck.data_too_large]
    return hypothesis_settings(deadline=None, suppress_health_check=slow)

"""Run passes in order: check requires, run, lint, verify, record."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils import _pytree as pytree

from ._util import first_line, user_frame
from .errors import BadInputError, PassError, PreconditionError, SparsecError, VerificationError
from .compare import compare_outputs, tolerance
from .passes.base import Pass, providers_of
from .program import PassRecord, Program, Prop

__all__ = ["run_passes", "compare_outputs", "check_finite", "check_metric", "tolerance",
           "dump_graph"]


def run_passes(program: Program, passes: Sequence[Pass], *, verify: bool = True,
               dump_dir: str | Path | None = None, inplace: bool = False,
               on_pass: Callable[[PassRecord], None] | None = None) -> Program:
    """Apply `passes` to a copy of `program` (or to `program` itself when `inplace`).

    With `verify`, each pass's output is compared on the example inputs with its reference
    (the program before it, or the pass's stated reference) and the end result with the
    program as it came in; errors land in each `PassRecord.verify` and in
    `program.state["verify"]`.
    """
    program = program if inplace else program.copy()
    inputs = program.example_inputs
    if verify:
        check_finite(inputs)
        entry_out = program.run_checked(*inputs)
        _check_no_nan(entry_out)
    if dump_dir is not None:
        dump_graph(program, dump_dir, 0, "input")
    done: list[str] = []
    for i, p in enumerate(passes, start=1):
        _check_requires(p, program)
        ref = _reference(p, program) if verify else None
        code_before = program.gm.code if verify else None
        start = time.perf_counter()
        result = _run_pass(p, program, done)
        ms = (time.perf_counter() - start) * 1e3
        _lint(p, program, done)
        if verify and not result.modified and program.gm.code != code_before:
            raise PassError(p.name, done, RuntimeError(
                "returned modified=False but changed the graph; return modified=True"))
        record = PassRecord(p.name, _jsonable(p.options()), bool(result.modified),
                            dict(result.stats), ms)
        if verify:
            record.verify = _verify(p, program, ref)
        program.props = (program.props - set(p.invalidates)) | set(p.establishes)
        if verify:
            _check_props(p, program, done)
        program.history.append(record)
        done.append(p.name)
        if dump_dir is not None:
            dump_graph(program, dump_dir, i, p.name)
        if on_pass is not None:
            on_pass(record)
    if verify:
        program.state["verify"] = _summary(program, entry_out)
    return program


# What each core prop says about the program, checked after every pass under verify: a pass
# that establishes a prop must make it true, and one that leaves it must keep it true.
PROP_CHECKS: dict[str, tuple[Callable[[Program], bool], str]] = {
    Prop.FORWARD_GRAPH: (lambda p: not p.is_training_step, "the program is a training step"),
    Prop.JOINT_GRAPH: (lambda p: p.is_training_step, "the program is not a training step "
                       "(program.joint is None)"),
    Prop.BACKWARD_PRUNED: (lambda p: p.is_training_step, "the program has no backward graph"),
}


def _check_props(p: Pass, program: Program, done: list[str]) -> None:
    for prop in sorted(program.props):
        check = PROP_CHECKS.get(prop)
        if check is not None and not check[0](program):
            raise PassError(p.name, done, RuntimeError(f"the program holds prop '{prop}' but "
                                                       f"{check[1]}"))
    if program.is_training_step and Prop.JOINT_GRAPH not in program.props:
        raise PassError(p.name, done, RuntimeError(
            f"the program is a training step but lacks prop '{Prop.JOINT_GRAPH}'"))


def _check_requires(p: Pass, program: Program) -> None:
    missing = set(p.requires) - program.props
    if missing:
        raise PreconditionError(p.name, missing, {m: providers_of(m) for m in missing},
                                _removed_by(missing, program))


def _removed_by(props: set[str], program: Program) -> dict[str, str]:
    """The last earlier pass that invalidated each of `props` (to name it in the error)."""
    from .passes.base import registered_passes

    known = registered_passes()
    out: dict[str, str] = {}
    for record in program.history:
        cls = known.get(record.name)
        for prop in props & set(getattr(cls, "invalidates", ())):
            out[prop] = record.name
    return out


def _run_pass(p: Pass, program: Program, done: list[str]):
    try:
        result = p.run(program)
    except BadInputError as e:  # the user's options or model, found out while running
        raise type(e)(f"pass '{p.name}': {e}") from e
    except SparsecError:
        raise
    except Exception as e:
        where = user_frame(e, program.source.path)
        if where:  # the user's model or loss raised while the pass ran it
            raise BadInputError(f"{where}: pass '{p.name}' ran model.py code that raised "
                                f"{type(e).__name__}: {first_line(e)}; fix model.py") from e
        raise PassError(p.name, done, e) from e
    if result is None:
        raise PassError(p.name, done, TypeError("run() returned None instead of a PassResult"))
    return result


def _lint(p: Pass, program: Program, done: list[str]) -> None:
    try:
        program.gm.graph.lint()
        program.gm.recompile()
    except Exception as e:
        raise PassError(p.name, done, RuntimeError(f"produced an invalid graph: {e}")) from e


_BEFORE = "program before the pass"


def _reference(p: Pass, program: Program) -> tuple[Any, str]:
    """The pass's stated reference (a function, run after the pass on the then example
    inputs, since a pass may change them), or the outputs of the program before it."""
    fn = p.reference(program)
    if fn is None:
        return program.run_checked(*program.example_inputs), _BEFORE
    return fn, getattr(fn, "reference_name", f"{p.name} reference")


def _verify(p: Pass, program: Program, ref: tuple[Any, str]) -> dict[str, Any]:
    expected, name = ref
    inputs = program.example_inputs
    if name != _BEFORE:
        expected = _run(expected, inputs)
    got = program.run_checked(*inputs)
    err = compare_outputs(got, expected)
    err["reference"] = name
    rtol = tolerance(got, p.rtol)
    err["rtol"] = rtol
    metric = check_metric(program)
    err["metric"] = metric
    if not (err[metric] <= rtol):  # also catches NaN
        raise VerificationError(
            f"pass '{p.name}' changed the outputs: {metric.replace('_', ' ')} {err[metric]:.3g} "
            f"> {rtol:.1g} against the {name} (max abs {err['max_abs_err']:.3g}); "
            "rerun with --no-verify to inspect, and report it")
    return err


def check_metric(program: Program) -> str:
    """Which error a verification holds to its tolerance: the max relative error for a forward
    program; for a training step (loss and gradients) the normwise relative error, since a
    gradient's near-cancelled entries carry rounding noise far above their own size (the max
    relative error is still reported)."""
    return "rel_l2_err" if program.is_training_step else "max_rel_err"


def _summary(program: Program, entry_out: Any) -> dict[str, Any]:
    per_pass = [r.verify for r in program.history if r.verify]
    worst = max(per_pass, key=lambda v: v[v.get("metric", "max_rel_err")] / v.get("rtol", 1.0),
                default=None)
    try:  # a pass that turns the model into a training step changes what the program returns
        end = compare_outputs(program.run_checked(*program.example_inputs), entry_out)
    except VerificationError:
        end = None
    stated = [r.name for r in program.history if r.verify and r.verify["reference"] != _BEFORE]
    reference = ("eager model" if not stated else
                 "eager model, with stated references for " + ", ".join(stated))
    out = dict(worst or end or {"max_abs_err": 0.0, "max_rel_err": 0.0})
    out.pop("rtol", None)
    out["reference"] = reference
    out["end_to_end"] = end
    return out


def _run(fn: Callable[..., Any], inputs: tuple) -> Any:
    with torch.no_grad():
        out = fn(*inputs)
    return pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, out)


def check_finite(inputs: tuple) -> None:
    """Refuse NaN/Inf example inputs: verification against them proves nothing."""
    for i, t in enumerate(pytree.tree_leaves(inputs)):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise BadInputError(f"example input {i} contains NaN or Inf; fix example_inputs() "
                                "or pass --no-verify")


def _check_no_nan(outputs: Any) -> None:
    """Refuse a model whose outputs on finite example inputs hold NaN: every comparison with
    them would be vacuous there."""
    for t in pytree.tree_leaves(outputs):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and bool(t.isnan().any()):
            raise BadInputError("the model's outputs on example_inputs() contain NaN, so "
                                "verification would prove nothing; fix model() or pass "
                                "--no-verify")


def dump_graph(program: Program, dump_dir: str | Path, index: int, name: str) -> Path:
    """Write the graph as readable Python: `NNN_<name>.py`."""
    d = Path(dump_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{index:03d}_{name}.py"
    text = program.gm.print_readable(print_output=False, include_stride=False, include_device=False)
    header = f"# sparsec: graph after {name!r}; props: {', '.join(sorted(program.props))}\n"
    path.write_text(header + text)
    return path


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    def conv(v: Any) -> Any:
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, (str, int, float, bool)) or v is None:
            return v
        return str(v)
    return {k: conv(v) for k, v in options.items()}

"""Dynamic batch and sequence axes for the onnx backend.

A Program's graph comes from `torch.export` at the example shapes, so its sizes are literal
ints and it cannot be re-exported with symbolic ones. When the eager module is known
(`program.source.module`, set by `sparsec.trace`), it is traced again with `torch.export.Dim`
dims, the program's graph-changing passes are re-run on that graph (sparse fine-tuning is not:
its effect is in the merged weights), and every parameter and buffer of the program to deploy
is put in by name. The re-built program is checked against the program to deploy on the example
inputs before it is exported, and the ONNX model is checked against it at a second shape.

Which axes: dim 0 of every input (batch) when the example batch is ≥ 2 (torch.export fixes
sizes 0 and 1); dim 1 of every input of rank ≥ 2 (sequence) unless the program has block-sparse
attention, whose layouts are built for the traced length. torch.export may still fix an axis
the model needs fixed; the axes reported are those the ONNX model really has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .._util import first_line, quiet
from ..pipeline import compare_outputs, run_passes, tolerance
from ..program import Program, Prop

__all__ = ["DynamicPlan", "plan_dynamic", "resize_inputs", "second_shape", "SKIPPED_PASSES"]

# Passes whose effect the export already carries in the merged weights.
SKIPPED_PASSES = ("sparse-finetune", "merge-sparse")
_NAMES = ("batch", "seq")


@dataclass
class DynamicPlan:
    """What to export and how: `program` (the re-built one when axes are dynamic),
    `dynamic_shapes` for `torch.onnx.export`, `sizes` {axis name: (example size, other size)}
    for the second-shape check, and `notes` saying why an axis stayed static."""

    program: Program
    dynamic_shapes: Any = None
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def dynamic(self) -> bool:
        return self.dynamic_shapes is not None


def _leaves(inputs: tuple) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]


def _axes(deployed: Program, mode: str) -> tuple[dict[int, str], list[str]]:
    """{dim: axis name} to try, and why the others stay static."""
    notes: list[str] = []
    if mode == "none":
        return {}, ["static shapes (dynamic = \"none\")"]
    leaves = _leaves(deployed.example_inputs)
    dims: dict[int, str] = {}
    batch = {t.shape[0] for t in leaves if t.dim() >= 1}
    if len(batch) != 1:
        notes.append("batch static: the inputs disagree on dim 0")
    elif batch.pop() < 2:
        notes.append("batch static: the example batch is 1 (torch.export fixes sizes 0 and "
                     "1); give example_inputs() a batch of 2 or more")
    else:
        dims[0] = "batch"
    attention = [n for n in deployed.gm.graph.nodes
                 if n.target is torch.ops.sparsec.block_sparse_attention.default]
    if mode == "batch":
        notes.append("sequence static (dynamic = \"batch\")")
    elif attention:
        lengths = sorted({int(n.args[0].meta["val"].shape[-2]) for n in attention})
        notes.append(f"sequence static: block-sparse attention layouts are built for the traced "
                     f"length ({', '.join(map(str, lengths))})")
    elif len({t.shape[1] for t in leaves if t.dim() >= 2}) == 1:
        dims[1] = "seq"
    elif any(t.dim() >= 2 for t in leaves):
        notes.append("sequence static: the inputs disagree on dim 1")
    return dims, notes


def plan_dynamic(deployed: Program, original: Program, mode: str = "auto") -> DynamicPlan:
    """Re-build `deployed` (the merged copy of `original`) with dynamic axes, or say why not."""
    dims, notes = _axes(deployed, mode)
    static = DynamicPlan(deployed, notes=notes)
    if not dims:
        return static
    module = getattr(original.source, "module", None)
    if module is None:
        static.notes.append("static shapes: the program was not traced by sparsec.trace, so "
                            "there is no module to re-trace with dynamic shapes")
        return static
    try:
        twin, spec, sizes = _retrace(module, deployed, original, dims)
    except _Refused as e:
        static.notes.append(f"static shapes: {e}")
        return static
    for dim, name in dims.items():
        if name not in sizes:
            what = "batch" if dim == 0 else "sequence"
            notes.append(f"{what} static: torch.export fixed dim {dim} (the model needs its "
                         "traced size)")
    return DynamicPlan(twin, spec, sizes, notes)


class _Refused(Exception):
    """The re-built program cannot stand in for the deployed one (the message says why)."""


def _retrace(module, deployed: Program, original: Program, dims: dict[int, str]):
    from torch.export import Dim

    from ..frontend import _drop_guards, tie_aliases, tracing_model
    from ..passes.canonicalize import causal_attention, matmuls_to_linear

    inputs = deployed.example_inputs
    auto = _spec(inputs, {d: Dim.AUTO for d in dims})
    try:
        with quiet(), tracing_model(module):
            ep = torch.export.export(module, inputs, dynamic_shapes=auto, strict=False)
    except Exception as e:
        raise _Refused(f"re-tracing with dynamic axes failed ({type(e).__name__}: "
                       f"{first_line(e)})") from e
    named, sizes = _named_dims(ep, inputs, dims)
    if not sizes:
        raise _Refused("torch.export fixed every axis the model was asked to vary")
    gm = ep.module()
    _drop_guards(gm)
    tie_aliases(gm)
    matmuls_to_linear(gm)
    causal_attention(gm)
    twin = Program(gm=gm, example_inputs=inputs, source=original.source)
    _rerun_passes(twin, original)
    _transplant(twin, deployed)
    _check_same(twin, deployed)
    return twin, _spec(inputs, named), sizes


def _spec(inputs: tuple, per_dim: dict[int, Any]):
    """dynamic_shapes mirroring `inputs`: {dim: Dim} for tensors, None for the rest."""
    def one(x):
        if not isinstance(x, torch.Tensor):
            return None
        return {d: v for d, v in per_dim.items() if d < x.dim()} or None
    return tuple(pytree.tree_map(one, x) for x in inputs)


def _named_dims(ep, inputs: tuple, dims: dict[int, str]):
    """Named Dims with the ranges torch.export found, for the axes that stayed symbolic, and
    {name: (example size, a second size in range)}."""
    import sympy
    from torch.export import Dim
    from torch.utils._sympy.numbers import int_oo

    users = [n for n in ep.graph.nodes if n.op == "placeholder"
             and n.name in ep.graph_signature.user_inputs]
    leaves = _leaves(inputs)
    named: dict[int, Any] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for dim, name in dims.items():
        syms = [users[i].meta["val"].shape[dim] for i, t in enumerate(leaves)
                if t.dim() > dim and i < len(users)]
        exprs = [getattr(getattr(x, "node", None), "expr", None) for x in syms]
        if not exprs or not all(isinstance(e, sympy.Symbol) for e in exprs):
            continue  # fixed by torch.export
        # inputs that share the axis (input_ids, attention_mask) may each get their own
        # symbol; the deployed model takes one size for all of them: the ranges' intersection
        ranges = [ep.range_constraints.get(e) for e in exprs]
        lo = max([int(vr.lower) for vr in ranges if vr is not None] or [2])
        his = [int(vr.upper) for vr in ranges if vr is not None and vr.upper != int_oo]
        hi = min(his) if his else None
        example = int(next(t.shape[dim] for t in leaves if t.dim() > dim))
        other = _second_size(example, lo, hi, shorter=dim > 0)
        if other is None:
            continue
        named[dim] = Dim(name, min=lo, max=hi) if hi is not None else Dim(name, min=lo)
        sizes[name] = (example, other)
    return named, sizes


def _second_size(example: int, lo: int, hi: int | None, shorter: bool) -> int | None:
    """A second size in [max(lo, 2), hi] for the parity check. Sequences check a shorter
    length first: a position table sized for the traced length holds every shorter one."""
    lo = max(lo, 2)
    tries = (example - 1, example + 1) if shorter else (example + 1, example - 1)
    return next((n for n in tries if n >= lo and (hi is None or n <= hi)), None)


def _rerun_passes(twin: Program, original: Program) -> None:
    from ..passes.base import get_pass
    from ..recipe import make_pass

    records, passes = [], []
    for r in original.history:
        cls = get_pass(r.name)
        if Prop.JOINT_GRAPH in cls.requires | cls.establishes:
            break  # the training step: what follows does not shape the forward graph
        if r.modified and r.name not in SKIPPED_PASSES:
            opts = {k: tuple(v) if isinstance(v, list) else v for k, v in r.options.items()}
            records.append(r)
            passes.append(make_pass(cls, opts))
    try:
        run_passes(twin, passes, verify=False, inplace=True)
    except Exception as e:
        raise _Refused(f"re-running the passes on the dynamic graph failed "
                       f"({type(e).__name__}: {first_line(e)})") from e
    for before, again in zip(records, twin.history):
        if before.stats != again.stats:
            raise _Refused(f"pass '{before.name}' did something else on the dynamic graph "
                           f"({again.stats} vs {before.stats})")


def _transplant(twin: Program, deployed: Program) -> None:
    """Put every tensor of the deployed program into the twin, by name (new objects: the
    twin's own may be the eager module's)."""
    want = _tensors(deployed.gm)
    have = _tensors(twin.gm)
    if set(want) != set(have):
        diff = sorted(set(want) ^ set(have))[:3]
        raise _Refused(f"the re-traced program has other parameters ({', '.join(diff)} …)")
    for name, t in want.items():
        if have[name].shape != t.shape or have[name].dtype != t.dtype:
            raise _Refused(f"'{name}' has another shape or dtype in the re-traced program")
        _replace(twin.gm, name, t.detach().clone())


def _tensors(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers, persistent or not, by qualified name."""
    return {**dict(gm.named_parameters(remove_duplicate=False)),
            **dict(gm.named_buffers(remove_duplicate=False))}


def _replace(root: torch.nn.Module, qualname: str, value: torch.Tensor) -> None:
    *parents, leaf = qualname.split(".")
    mod = root
    for part in parents:
        mod = getattr(mod, part)
    if leaf in mod._parameters:
        mod._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[leaf] = value


def _check_same(twin: Program, deployed: Program) -> None:
    inputs = deployed.example_inputs
    with torch.no_grad():
        want, got = deployed.gm(*inputs), twin.gm(*inputs)
    err = compare_outputs(got, want)
    if not err["max_rel_err"] <= tolerance(want, 1e-6):
        raise _Refused(f"the re-traced program differs from the compiled one (max relative "
                       f"error {err['max_rel_err']:.3g})")


def resize_inputs(inputs: tuple, dims: dict[int, int]) -> tuple:
    """`inputs` with tensor dims resized (tiled, then cut): values stay in their domain."""
    def one(x):
        if not isinstance(x, torch.Tensor):
            return x
        for d, n in dims.items():
            if x.dim() > d and x.shape[d] != n:
                reps = -(-n // x.shape[d])
                x = torch.cat([x] * reps, dim=d).narrow(d, 0, n)
        return x.contiguous()
    return pytree.tree_map(one, inputs)


def second_shape(plan: DynamicPlan) -> tuple | None:
    """The example inputs at the plan's second sizes (None when nothing is dynamic)."""
    if not plan.dynamic:
        return None
    index = {"batch": 0, "seq": 1}
    return resize_inputs(plan.program.example_inputs,
                         {index[n]: other for n, (_, other) in plan.sizes.items()})

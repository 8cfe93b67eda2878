"""`sparse-finetune`: make a sparse subset of the linear weights trainable, freeze the rest.

Each targeted `aten.linear` becomes one sparsec op (see sparsec/ops): `delta` adds a sparse
trainable Δ at k chosen entries, `structured` a dense Δ on chosen rows or columns, `nm` trains
the weight itself under an N:M mask with SR-STE. New tensors are registered on the
GraphModule (indices as buffers, values as parameters), so they serialize, export and reach
kernels as arguments. What the pass did goes to `program.state["sparse_finetune"]` (read by the
Trainer and by sparsec.training.deltas) and to the report section `sparse_finetune`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx

from .. import ops as _ops  # noqa: F401  (registers torch.ops.sparsec.*)
from ..errors import BadInputError, OptionError
from ..program import Program, Prop, module_path, node_info
from . import selection
from .base import Pass, PassResult, option, register

__all__ = ["SparseFinetune", "Target", "find_targets", "finetune_nodes", "FINETUNE_OPS",
           "in_block", "refresh_report"]

_LINEAR = torch.ops.aten.linear.default
FINETUNE_OPS = {
    torch.ops.sparsec.sparse_delta_linear.default: "delta",
    torch.ops.sparsec.structured_linear.default: "structured",
    torch.ops.sparsec.nm_linear.default: "nm",
}
# Ops a linear's output may pass through before a residual add (eval-mode dropout, copies).
_PASS_THROUGH = {torch.ops.aten.dropout.default, torch.ops.aten.clone.default,
                 torch.ops.aten.alias.default}


@dataclass
class Target:
    """One linear layer the pass rewrites."""

    node: fx.Node
    path: str
    weight: str  # qualname of the weight parameter on the GraphModule
    shape: tuple[int, int]

    @property
    def prefix(self) -> str:
        # beside the weight, in its module; a weight not named `weight` gets its own submodule
        return self.weight[:-len(".weight")] if self.weight.endswith(".weight") \
            else f"{self.weight}_sparse"


@register
@dataclass(frozen=True)
class SparseFinetune(Pass):
    """Sparse fine-tuning on the forward graph: `delta`, `structured` or `nm`.

    delta: frozen W plus trainable values at k entries (density or budget; select magnitude,
    gradient, random or principal), optionally pruned and regrown during training.
    structured: trainable rows or columns of W (S2FT), in blocks of `block` lines (a head's
    dimension selects heads); `axis = "auto"` takes columns for layers that feed a residual add
    (o_proj, down_proj) and rows elsewhere (q/k/v, up/gate).
    nm: N:M sparse training with SR-STE; the weight itself trains under its N:M mask.
    Targets are globs on module paths (from nn_module_stack); by default every linear layer
    inside the blocks (a path with an index, such as layers.0.mlp.up_proj). Tied or shared
    weights are left alone. Everything else is frozen, except parameters matching `dense`.
    """

    name = "sparse-finetune"
    summary = "train a sparse subset of linear weights (delta, structured, nm); freeze the rest"
    requires = frozenset({Prop.FORWARD_GRAPH})
    establishes = frozenset({Prop.SPARSE_PARAMETERS})

    method: str = option("delta", "delta | structured | nm", choices=("delta", "structured", "nm"))
    density: float = option(0.01, "share of each target's weights (delta) or lines "
                            "(structured) that train", min=1e-4, max=0.5)
    budget: int = option(0, "trainable values over all targets (instead of density); 0: use "
                         "density", min=0)
    select: str = option("magnitude", "which entries/lines train",
                         choices=("magnitude", "gradient", "random", "principal", "norm"))
    targets: tuple[str, ...] = option((), "globs on module paths; default: every linear layer "
                                      "inside the blocks")
    dense: tuple[str, ...] = option((), "globs of parameter names that train densely "
                                    "(e.g. a task head)")
    rank: int = option(8, "rank of the approximation for select='principal'", min=1)
    axis: str = option("auto", "structured: rows, columns or auto",
                       choices=("auto", "rows", "columns"))
    block: int = option(1, "structured: lines per selected unit (head_dim selects heads)", min=1)
    n: int = option(2, "nm: weights kept per group", min=1)
    m: int = option(4, "nm: group size along the input dimension", min=1)
    decay: float = option(2e-4, "nm: SR-STE decay λ on pruned weights", min=0.0)
    regrow_every: int = option(0, "delta: prune and regrow every this many steps (0: never)",
                               min=0)
    regrow_fraction: float = option(0.1, "delta: share of entries dropped and regrown",
                                    min=0.0, max=1.0)
    regrow_warmup: int = option(128, "delta: steps over which a regrown entry's update ramps "
                                "linearly from 1/N to full (0 or 1: no warm-up)", min=0)
    seed: int = option(0, "seed of random selections")
    calibration_batches: int = option(4, "batches for select='gradient'", min=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        allowed = {"delta": ("magnitude", "gradient", "random", "principal"),
                   "structured": ("norm", "magnitude", "gradient", "random"), "nm": None}
        ok = allowed[self.method]
        if ok is not None and self.select not in ok:
            raise OptionError(f"option 'sparse-finetune.select' is {self.select!r}, which "
                              f"method={self.method!r} does not take; choose one of "
                              f"{', '.join(map(repr, ok))}")
        if self.n > self.m:
            raise OptionError(f"option 'sparse-finetune.n' is {self.n} > m={self.m}; N:M needs "
                              "n <= m")

    @classmethod
    def hypothesis_options(cls):
        """Consistent option sets for `sparsec.testing.strategies.recipes()`."""
        from hypothesis import strategies as st

        def for_method(method: str):
            selects = {"delta": ("magnitude", "random", "principal"),
                       "structured": ("norm", "magnitude", "random"), "nm": ("magnitude",)}
            nm = st.sampled_from([(1, 2), (2, 4), (1, 4)])
            return st.fixed_dictionaries({
                "method": st.just(method),
                "density": st.sampled_from((0.01, 0.1, 0.5)),
                "select": st.sampled_from(selects[method]),
                "targets": st.sampled_from(((), ("*",), ("blocks.0.*",))),
                "rank": st.integers(1, 4),
                "seed": st.integers(0, 9),
                "nm": nm,
            }).map(lambda d: {**{k: v for k, v in d.items() if k != "nm"},
                              "n": d["nm"][0], "m": d["nm"][1]})

        return st.sampled_from(("delta", "structured", "nm")).flatmap(for_method)

    # running ---------------------------------------------------------------------------------
    def run(self, program: Program) -> PassResult:
        targets, skipped = find_targets(program, self.targets)
        if self.method == "nm":
            targets = self._nm_fit(targets, skipped)
        grads = self._calibration(program, targets)
        rewrite = {"delta": self._delta, "structured": self._structured, "nm": self._nm}
        records = rewrite[self.method](program, targets, grads) if targets else {}
        state = program.state.setdefault("sparse_finetune", {"targets": {}})
        state["targets"].update(records)
        state.setdefault("dense", [])
        state["dense"] = sorted(set(state["dense"]) | set(self.dense))
        changed = _freeze(program, state)
        section = refresh_report(program, skipped)
        stats = {"rewritten": len(records), "skipped": len(skipped),
                 "trainable": section["trainable_in_targets"],
                 "density": round(section["density"], 6)}
        return PassResult(modified=bool(records) or changed > 0, stats=stats)

    def reference(self, program: Program) -> Callable[..., Any] | None:
        """For `nm`: the program before the pass with independently N:M-masked weights."""
        if self.method != "nm":
            return None
        ref = program.copy()
        targets, skipped = find_targets(ref, self.targets)
        with torch.no_grad():
            for t in self._nm_fit(targets, skipped):
                w = ref.gm.get_parameter(t.weight)
                w.mul_(_nm_mask_by_sort(w, self.n, self.m))
        fn = ref.gm
        fn.reference_name = f"eager model with {self.n}:{self.m}-masked weights"
        return fn

    # methods ---------------------------------------------------------------------------------
    def _calibration(self, program: Program, targets: list[Target]) -> dict[str, torch.Tensor]:
        if self.select != "gradient" or not targets:
            return {}
        return selection.calibration_grads(program, [t.weight for t in targets],
                                           self.calibration_batches)

    def _delta(self, program: Program, targets: list[Target], grads) -> dict[str, dict]:
        counts = selection.allocate([t.shape[0] * t.shape[1] for t in targets],
                                    density=self.density, budget=self.budget)
        out = {}
        for i, (t, k) in enumerate(zip(targets, counts)):
            if k == 0:
                continue
            w = program.gm.get_parameter(t.weight)
            idx = selection.select_entries(w, k, self.select, rank=self.rank,
                                           seed=self.seed + i, grad=grads.get(t.weight))
            names = {"indices": f"{t.prefix}.delta_indices", "values": f"{t.prefix}.delta_values"}
            i_node = program.add_buffer(names["indices"], idx, before=t.node)
            v_node = program.add_parameter(names["values"], torch.zeros(k, dtype=w.dtype,
                                                                         device=w.device),
                                           trainable=True, before=t.node)
            x, wn, b = _linear_args(t.node)
            _replace(program, t.node, torch.ops.sparsec.sparse_delta_linear.default,
                     (x, wn, b, i_node, v_node), "delta")
            out[t.weight] = self._record(t, "delta", names, k,
                                         regrow_every=self.regrow_every,
                                         regrow_fraction=self.regrow_fraction,
                                         regrow_warmup=self.regrow_warmup)
        return out

    def _structured(self, program: Program, targets: list[Target], grads) -> dict[str, dict]:
        plans = []
        for t in targets:
            axis = self._axis(t)
            lines = t.shape[axis]
            if lines % self.block:
                raise BadInputError(f"{t.path}: {lines} {'rows' if axis == 0 else 'columns'} "
                                    f"are not divisible by block={self.block}; choose a block "
                                    "that divides them or narrow `targets`")
            plans.append((t, axis, lines // self.block, self.block * t.shape[1 - axis]))
        if self.budget > 0:  # split the budget in values, then round to whole units
            shares = selection.allocate([p[2] * p[3] for p in plans], density=0.0,
                                        budget=self.budget)
            counts = [min(p[2], max(1, round(s / p[3]))) for p, s in zip(plans, shares)]
        else:
            counts = selection.allocate([p[2] for p in plans], density=self.density)
        out = {}
        for i, ((t, axis, _, _), count) in enumerate(zip(plans, counts)):
            w = program.gm.get_parameter(t.weight)
            index = selection.select_units(w, count, axis, self.block, self.select,
                                           seed=self.seed + i, grad=grads.get(t.weight))
            shape = (index.numel(), t.shape[1]) if axis == 0 else (t.shape[0], index.numel())
            names = {"index": f"{t.prefix}.struct_index", "delta": f"{t.prefix}.struct_delta"}
            i_node = program.add_buffer(names["index"], index, before=t.node)
            d_node = program.add_parameter(names["delta"], torch.zeros(shape, dtype=w.dtype,
                                                                        device=w.device),
                                           trainable=True, before=t.node)
            x, wn, b = _linear_args(t.node)
            _replace(program, t.node, torch.ops.sparsec.structured_linear.default,
                     (x, wn, b, i_node, d_node, axis), "structured")
            out[t.weight] = self._record(t, "structured", names, shape[0] * shape[1],
                                         axis=axis, block=self.block, lines=index.numel())
        return out

    def _nm_fit(self, targets: list[Target], skipped: dict[str, str]) -> list[Target]:
        fit = []
        for t in targets:
            if t.shape[1] % self.m:
                skipped[t.path] = f"in_features {t.shape[1]} not divisible by m={self.m}"
            else:
                fit.append(t)
        return fit

    def _nm(self, program: Program, targets: list[Target], grads) -> dict[str, dict]:
        out = {}
        for t in targets:
            x, wn, b = _linear_args(t.node)
            _replace(program, t.node, torch.ops.sparsec.nm_linear.default,
                     (x, wn, b, self.n, self.m, self.decay), "nm")
            out[t.weight] = self._record(t, "nm", {"weight": t.weight},
                                         t.shape[0] * t.shape[1], n=self.n, m=self.m,
                                         decay=self.decay)
        return out

    def _axis(self, t: Target) -> int:
        if self.axis != "auto":
            return 0 if self.axis == "rows" else 1
        return 1 if _feeds_residual(t.node) else 0

    def _record(self, t: Target, method: str, params: dict[str, str], trainable: int,
                **extra: Any) -> dict[str, Any]:
        return {"method": method, "path": t.path, "shape": list(t.shape), "params": params,
                "trainable": trainable, "select": None if method == "nm" else self.select,
                **extra}


# targets ---------------------------------------------------------------------------------------
def in_block(path: str) -> bool:
    """Whether a module path lies inside a repeated block (has an index, e.g. layers.3.mlp)."""
    return any(part.isdigit() for part in path.split("."))


def find_targets(program: Program,
                 globs: tuple[str, ...] = ()) -> tuple[list[Target], dict[str, str]]:
    """The `aten.linear` nodes to rewrite, and why others that matched were skipped.

    Raises BadInputError when `globs` match no linear layer (rewritten ones included).
    """
    gm = program.gm
    shared = _shared_parameters(gm)
    attr_uses: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            attr_uses[n.target] = attr_uses.get(n.target, 0) + len(n.users)
    targets, skipped, matched = [], {}, 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or (node.target is not _LINEAR
                                          and node.target not in FINETUNE_OPS):
            continue
        path = module_path(node)
        if not (any(fnmatch.fnmatchcase(path, g) for g in globs) if globs else in_block(path)):
            continue
        matched += 1
        if node.target is not _LINEAR:
            continue  # rewritten by an earlier run
        reason = _unsuitable(gm, node, shared, attr_uses)
        if reason:
            skipped[path or f"(root) {node.name}"] = reason
            continue
        w = gm.get_parameter(node.args[1].target)
        targets.append(Target(node, path, node.args[1].target, tuple(w.shape)))
    if globs and not matched:
        all_paths = {module_path(n) for n in program.call_nodes(_LINEAR)}
        paths = sorted(p for p in all_paths if p)
        if paths:
            example = f"; module paths look like '{paths[0]}'"
        elif all_paths:  # linear layers called by the root module have the empty path
            example = "; the model's linear layers belong to the root module (path ''), which "
            example += "only the glob '*' matches"
        else:
            example = "; the model has no linear layer"
        raise BadInputError(f"targets {list(globs)} match no linear layer{example}")
    if not globs and not matched:
        raise BadInputError("no linear layer inside the model's blocks (paths with an index "
                            "such as 'layers.0.mlp'); set `targets` to module-path globs")
    return targets, skipped


def _unsuitable(gm: fx.GraphModule, node: fx.Node, shared: set[str],
                attr_uses: dict[str, int]) -> str | None:
    w = node.args[1]
    if not isinstance(w, fx.Node) or w.op != "get_attr":
        return "weight is computed in the graph, not a parameter"
    try:
        p = gm.get_parameter(w.target)
    except AttributeError:
        return "weight is a buffer or constant, not a parameter"
    if w.target in shared or attr_uses.get(w.target, 0) > 1:
        return "weight is tied or shared with another use"
    if p.dim() != 2 or not p.is_floating_point():
        return "weight is not a 2-D floating-point matrix"
    return None


def _shared_parameters(gm: fx.GraphModule) -> set[str]:
    by_id: dict[int, list[str]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {n for names in by_id.values() if len(names) > 1 for n in names}


def _feeds_residual(node: fx.Node) -> bool:
    """Whether the linear's output reaches an add directly (an output projection)."""
    cur = node
    while len(cur.users) == 1:
        (user,) = cur.users
        if user.target in _PASS_THROUGH:
            cur = user
            continue
        return user.target == torch.ops.aten.add.Tensor
    return False


def finetune_nodes(program: Program) -> list[fx.Node]:
    """The sparse fine-tuning op nodes in the graph, in order."""
    return [n for n in program.gm.graph.nodes if n.op == "call_function"
            and n.target in FINETUNE_OPS]


# rewriting and freezing ------------------------------------------------------------------------
def _linear_args(node: fx.Node) -> tuple[Any, Any, Any]:
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return x, w, b


def _replace(program: Program, old: fx.Node, target: Any, args: tuple, method: str) -> fx.Node:
    graph = program.gm.graph
    with graph.inserting_before(old):
        new = graph.call_function(target, args)
    new.meta.update(old.meta)
    new.meta.pop("sparsec", None)
    node_info(new)["sparse_finetune"] = method
    old.replace_all_uses_with(new)
    graph.erase_node(old)
    return new


def _freeze(program: Program, state: dict[str, Any]) -> int:
    """Freeze every parameter but the sparse values, nm weights and `dense` globs."""
    trainable = set()
    for rec in state["targets"].values():
        trainable.add(rec["params"]["weight" if rec["method"] == "nm" else
                                    ("values" if rec["method"] == "delta" else "delta")])
    changed = 0
    for name, p in program.gm.named_parameters():
        train = name in trainable or any(fnmatch.fnmatchcase(name, g) for g in state["dense"])
        changed += int(p.requires_grad != train)
        p.requires_grad_(train)
    return changed


def refresh_report(program: Program, skipped: dict[str, str] | None = None) -> dict[str, Any]:
    """Rebuild the `sparse_finetune` report section from the program's state."""
    state = program.state.get("sparse_finetune", {"targets": {}, "dense": []})
    per, targeted, trainable = [], 0, 0
    for weight, rec in state["targets"].items():
        size = rec["shape"][0] * rec["shape"][1]
        targeted, trainable = targeted + size, trainable + rec["trainable"]
        per.append({"name": rec["path"], "weight": weight, "method": rec["method"],
                    "shape": rec["shape"], "trainable": rec["trainable"],
                    "density": rec["trainable"] / size})
    dense = sum(p.numel() for n, p in program.gm.named_parameters()
                if any(fnmatch.fnmatchcase(n, g) for g in state.get("dense", ())))
    reports = program.state.setdefault("report", {})
    old = reports.get("sparse_finetune", {})
    section = {"methods": sorted({r["method"] for r in state["targets"].values()}),
               "targets": len(per), "targeted_weights": targeted,
               "trainable_in_targets": trainable,
               "density": trainable / targeted if targeted else 0.0,
               "dense_trainable": dense, "per_target": per,
               "skipped": {**old.get("skipped", {}), **(skipped or {})}}
    reports["sparse_finetune"] = section
    return section


def _nm_mask_by_sort(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The N:M mask by ranking with a sort (independent of the op's top-k), for verification."""
    groups = w.detach().abs().reshape(w.shape[0], -1, m)
    ranks = groups.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    return (ranks < n).reshape(w.shape)

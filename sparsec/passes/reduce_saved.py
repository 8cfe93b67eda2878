"""`reduce-saved`: keep fewer activations alive between the forward and the backward.

A joint graph saves every forward value its backward reads. This pass removes saved values in
two exact ways:

- **selections** — a value the backward reads only through a slice/index_select/gather gets
  that selection taken in the forward, so only the selected part is saved;
- **recomputation** — a value is recomputed in the backward, just before its first backward
  reader, from values the backward saves anyway (or parameters). With `recompute = "pointwise"`
  only chains of pointwise ops, views and cheap copies qualify (silu(gate) from gate, the RMSNorm
  output from its input and 1/rms); `"matmul"` also recomputes matrix products (the MLP's gate and
  up projections from the normed input: fewer bytes saved for more FLOPs, reported). Largest
  values go first; a value some recomputation reads stays saved.

Which values to recompute is chosen one of two ways (`strategy`): `"op-classes"` walks the saved
values largest first and recomputes each one whose chain (of the allowed op classes, at most
`max_chain` nodes) reads only values that stay saved; `"min-cut"` takes the minimum cut of the
forward graph between what is resident and what the backward reads (saved bytes plus a price on
recomputed FLOPs, passes/min_cut.py), which also finds a smaller set of values to save from which
several saved values can be rebuilt at once. With a budget, the min-cut prices matrix products by
bisection: the highest price (fewest recomputed FLOPs) whose predicted peak is under the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from .. import ops as _ops  # noqa: F401  (registers torch.ops.sparsec.*)
from ..memory import predict_peak, saved_activations, tensor_bytes
from ..program import Program, Prop
from .base import Pass, PassResult, option, register
from .min_cut import min_cut_saved, recompute_in_backward
from .prune_backward import matmul_flops, mutates, readers, role

__all__ = ["ReduceSaved"]

_SELECTIONS = {torch.ops.aten.slice.Tensor, torch.ops.aten.index_select.default,
               torch.ops.aten.select.int, torch.ops.aten.gather.default,
               torch.ops.aten.index.Tensor}
# Cheap data movement that may be recomputed beside pointwise ops.
_MOVES = {torch.ops.aten.cat.default, torch.ops.aten.clone.default,
          torch.ops.aten._to_copy.default, torch.ops.aten.slice.Tensor,
          torch.ops.aten.select.int, torch.ops.aten.expand.default,
          torch.ops.aten._unsafe_view.default, torch.ops.aten.view.default,
          torch.ops.aten.reshape.default, torch.ops.aten.t.default,
          torch.ops.aten.transpose.int, torch.ops.aten.permute.default,
          torch.ops.aten.unsqueeze.default, torch.ops.aten.squeeze.dim}
_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default}
# sparsec's fine-tuning linears are products too (x · (W + Δ)ᵀ), deterministic in their inputs
_LINEARS = {torch.ops.sparsec.sparse_delta_linear.default,
            torch.ops.sparsec.structured_linear.default}


@register
@dataclass(frozen=True)
class ReduceSaved(Pass):
    """Save fewer activations for the backward: take selections in the forward and recompute
    cheap values in the backward (see the module docstring for what qualifies)."""

    name = "reduce-saved"
    summary = "save only what the backward reads; recompute cheap values in the backward"
    requires = frozenset({Prop.JOINT_GRAPH})
    recompute: str = option("pointwise", "what the backward may recompute instead of saving",
                            choices=("none", "pointwise", "matmul"))
    budget_gib: float = option(0.0, "with recompute = \"matmul\": recompute matrix products "
                               "(most bytes saved per FLOP first) only until the predicted peak "
                               "is under this many GiB; 0: every one that qualifies",
                               min=0.0)
    max_chain: int = option(12, "with strategy = \"op-classes\": most nodes one recomputation "
                            "may repeat", min=1, max=64)
    strategy: str = option("op-classes", "how to choose what to recompute: largest values "
                           "first by op class, or a minimum cut of saved bytes plus recompute "
                           "cost", choices=("op-classes", "min-cut"))

    def run(self, program: Program) -> PassResult:
        gm = program.gm
        before = sum(saved_activations(gm).values())
        peak_before = predict_peak(gm).peak_bytes
        moved = _hoist_selections(gm.graph)
        extra: dict = {}
        if self.strategy == "min-cut":
            recomputed, flops, extra = _min_cut(gm, self.recompute, self.budget_gib)
        else:
            recomputed, flops = self._op_classes(gm)
        gm.recompile()
        after = sum(saved_activations(gm).values())
        stats = {"strategy": self.strategy, "selections_moved": moved, "recomputed": recomputed,
                 "recompute_matmul_flops": flops,
                 "saved_bytes": f"{before} -> {after}", "saved_bytes_removed": before - after,
                 "predicted_peak_bytes": f"{peak_before} -> {predict_peak(gm).peak_bytes}",
                 **extra}
        return PassResult(modified=moved + recomputed > 0, stats=stats)

    def _op_classes(self, gm: fx.GraphModule) -> tuple[int, int]:
        recomputed = flops = 0
        rounds = [] if self.recompute == "none" else [False]
        if self.recompute == "matmul":
            rounds.append(True)
        budget = int(self.budget_gib * 2**30) if self.budget_gib else None
        for matmul in rounds:
            while True:  # values pinned in one round may go in the next
                limit = budget if matmul else None
                count, cost = _recompute(gm, matmul, self.max_chain, limit)
                recomputed, flops = recomputed + count, flops + cost
                if not count:
                    break
        return recomputed, flops


# selections -----------------------------------------------------------------------------------
def _hoist_selections(graph: fx.Graph) -> int:
    moved = 0
    for node in list(graph.nodes):
        if role(node) != "forward":
            continue
        users = [u for u in node.users if role(u) == "backward"]
        if users and all(_hoistable(u, node) for u in users):
            for u in users:
                anchor = max([node, *u.all_input_nodes], key=_order(graph).__getitem__)
                anchor.append(u)
                u.meta.setdefault("sparsec", {})["role"] = "forward"
                moved += 1
    return moved


def _hoistable(user: fx.Node, value: fx.Node) -> bool:
    if user.target not in _SELECTIONS or user.args[0] is not value:
        return False
    # the selection's other inputs (indices) must exist in the forward already
    return all(role(a) not in ("backward", "optimizer")
               for a in user.all_input_nodes if a is not value)


def _order(graph: fx.Graph) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


# recomputation --------------------------------------------------------------------------------
def _recompute(gm: fx.GraphModule, matmul: bool, max_chain: int,
               budget: int | None) -> tuple[int, int]:
    """One round of recomputation; with a `budget` (bytes), stop once the predicted peak is
    under it, taking the values that save the most bytes per FLOP first."""
    graph = gm.graph
    if budget is not None and predict_peak(gm).peak_bytes <= budget:
        return 0, 0
    saved = [n for n in graph.nodes if role(n) == "forward" and n.op == "call_function"
             and any(role(u) == "backward" for u in n.users)]
    order = _order(graph)
    # largest first; among equals the earlier one, so a later value's chain can run through it
    saved.sort(key=lambda n: (-_bytes(n), order[n]))
    keep: set[fx.Node] = set(saved)  # what the backward still reads
    chains = {v: _chain(v, keep - {v}, matmul, max_chain) for v in saved}
    if budget is not None:  # the most bytes saved per FLOP spent first
        saved.sort(key=lambda v: -_bytes(v) / max(1, _flops(chains[v] or [])))
    pinned: set[fx.Node] = set()  # read by a recomputation: must stay saved
    count = flops = 0
    for value in saved:
        if value in pinned or value not in keep:
            continue
        chain = _chain(value, keep - {value}, matmul, max_chain)
        if chain is None or not _safe(graph, chain, value):
            continue
        flops += _flops(chain)
        _clone_into_backward(graph, chain, value)
        keep.discard(value)
        pinned.update(a for n in chain for a in n.all_input_nodes if a in keep)
        count += 1
        if budget is not None and predict_peak(gm).peak_bytes <= budget:
            break
    return count, flops


# min-cut --------------------------------------------------------------------------------------
_TIE = 1e-3  # recomputing a pointwise value or a view: a tie-break, per byte it would save
_CHEAPEST, _DEAREST = 1e-6, 1.0  # price range of a product's FLOP, in bytes (saved per FLOP)


def _min_cut(gm: fx.GraphModule, recompute: str, budget_gib: float) -> tuple[int, int, dict]:
    if recompute == "none":
        return 0, 0, {}
    matmul = recompute == "matmul"
    price = _CHEAPEST
    if matmul and budget_gib:
        price = _price_for_budget(gm, int(budget_gib * 2**30))
    count, clones = _cut_and_recompute(gm.graph, matmul, price)
    extra = {"recomputed_nodes": len(clones)}
    if matmul:
        extra["flop_price_bytes"] = price
    return count, _flops(clones), extra


def _cut_and_recompute(graph: fx.Graph, matmul: bool, price: float):
    def cost(node: fx.Node) -> float:
        if node.target in _MATMULS or node.target in _LINEARS:
            return price * _flops([node])
        return _TIE * _bytes(node)

    saved = min_cut_saved(graph, lambda n: _allowed(n, matmul), cost)
    return recompute_in_backward(graph, saved)


def _price_for_budget(gm: fx.GraphModule, budget: int) -> float:
    """The highest FLOP price whose cut keeps the predicted peak under `budget` (bisection in
    log space); the cheapest price if none does."""
    def fits(log_price: float) -> bool:
        trial = _copy(gm)
        _cut_and_recompute(trial.graph, True, 10**log_price)
        return predict_peak(trial).peak_bytes <= budget

    lo, hi = math.log10(_CHEAPEST), math.log10(_DEAREST)
    if fits(hi):
        return _DEAREST
    if not fits(lo):
        return _CHEAPEST
    for _ in range(10):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return 10**lo


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A graph copy sharing `gm`'s tensors, for trying a cut."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return fx.GraphModule(gm, graph)


def _flops(chain: list[fx.Node]) -> int:
    return matmul_flops(chain) + _linear_flops(chain)


def _linear_flops(nodes: list[fx.Node]) -> int:
    total = 0
    for n in nodes:
        if n.target in _LINEARS:
            total += 2 * n.meta["val"].numel() * n.args[0].meta["val"].shape[-1]
    return total


def _bytes(node: fx.Node) -> int:
    return tensor_bytes(node.meta.get("val"))


def _allowed(node: fx.Node, matmul: bool) -> bool:
    if node.op != "call_function" or mutates(node):
        return False
    target = node.target
    tags = getattr(target, "tags", ())
    if torch.Tag.nondeterministic_seeded in tags:
        return False  # dropout and friends: a second draw would differ
    return torch.Tag.pointwise in tags or target in _MOVES or (
        matmul and (target in _MATMULS or target in _LINEARS))


def _chain(value: fx.Node, frontier: set[fx.Node], matmul: bool,
           max_chain: int) -> list[fx.Node] | None:
    """The nodes to repeat to recompute `value` from `frontier` and resident tensors, in
    graph order, or None if that takes a disallowed op or more than `max_chain` nodes."""
    chain: set[fx.Node] = set()
    stack = [value]
    while stack:
        node = stack.pop()
        if node in chain:
            continue
        if not _allowed(node, matmul):
            return None
        chain.add(node)
        if len(chain) > max_chain:
            return None
        for a in node.all_input_nodes:
            if a.op in ("get_attr", "placeholder") or a in frontier or a in chain:
                continue
            stack.append(a)
    order = _order(value.graph)
    return sorted(chain, key=order.__getitem__)


def _safe(graph: fx.Graph, chain: list[fx.Node], value: fx.Node) -> bool:
    """No tensor the chain reads is updated in place before the recomputation would run."""
    order = _order(graph)
    first = min(order[u] for u in value.users if role(u) == "backward")
    reads = {a for n in chain for a in n.all_input_nodes if a not in chain}
    return not any(mutates(r) and order[r] < first for a in reads for r in readers(a))


def _clone_into_backward(graph: fx.Graph, chain: list[fx.Node], value: fx.Node) -> None:
    order = _order(graph)
    users = [u for u in value.users if role(u) == "backward"]
    first = min(users, key=order.__getitem__)
    env: dict[fx.Node, fx.Node] = {}
    with graph.inserting_before(first):
        for node in chain:
            clone = graph.node_copy(node, lambda a: env.get(a, a))
            clone.meta = {**node.meta, "sparsec": {**node.meta.get("sparsec", {}),
                                                    "role": "backward", "recomputed": True}}
            env[node] = clone
    for u in users:
        u.replace_input_with(value, env[value])

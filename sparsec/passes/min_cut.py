"""What a joint graph saves for its backward, chosen by a minimum cut (`reduce-saved`'s
`strategy = "min-cut"`).

Every forward value the backward reads must either be saved or be recomputed in the backward
from saved values and resident tensors (parameters, buffers, inputs). The choice is a cut of a
flow network built from the forward part of the graph:

- each forward node v becomes two vertices v.in → v.out joined by an edge whose capacity is
  what saving v costs (its bytes; 0 for a graph output, which stays alive anyway);
- a value v reads flows on: u.out → v.in, uncapacitated;
- a value the backward reads must reach the backward: v.out → sink, uncapacitated;
- recomputing v costs something: source → v.in, with capacity `recompute_cost(v)` (a small
  tie-break for pointwise ops, FLOPs times a price for matrix products), uncapacitated where v
  may not be recomputed at all (random ops, in-place ops, reductions, attention …).

In a finite cut, v.in on the source side and v.out on the sink side means "save v"; both on the
sink side means "recompute v in the backward". The cut's capacity is saved bytes plus
recompute cost, and a minimum cut (networkx, max-flow) minimizes it exactly; every recomputed
value's inputs are then saved or recomputed themselves, so the backward can always rebuild
what it reads. This is the formulation of AOTAutograd's min-cut rematerialization partitioner,
here on sparsec's tagged one-graph training step.
"""

from __future__ import annotations

from typing import Callable

import networkx as nx
from torch import fx
from torch.utils import _pytree as pytree

from ..memory import tensor_bytes
from .prune_backward import mutates, readers, role

__all__ = ["min_cut_saved", "recompute_in_backward", "read_by_backward"]

_SOURCE, _SINK = "source", "sink"


def read_by_backward(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if role(u) == "backward"]


def _forward(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if role(n) == "forward" and n.op == "call_function"]


def _bytes(node: fx.Node) -> int:
    return sum(tensor_bytes(v) for v in pytree.tree_leaves(node.meta.get("val")))


def _rewritten_later(node: fx.Node, order: dict[fx.Node, int], end: int) -> bool:
    """Whether an input of `node` is updated in place after `node` runs and before the
    backward's last node (`end`): a recomputation there could read the new value. Updates after
    the backward (the optimizer's, unless `optimizer-in-backward` ran first) do not matter."""
    return any(mutates(r) and order[node] < order[r] < end
               for a in node.all_input_nodes for r in readers(a))


def min_cut_saved(graph: fx.Graph, recomputable: Callable[[fx.Node], bool],
                  recompute_cost: Callable[[fx.Node], float]) -> set[fx.Node]:
    """The forward nodes to save (see the module docstring); the rest of what the backward
    reads is to be recomputed (`recompute_in_backward`)."""
    forward = _forward(graph)
    inside = set(forward)
    order = {n: i for i, n in enumerate(graph.nodes)}
    end = max((order[n] for n in graph.nodes if role(n) == "backward"), default=0)
    outputs = {a for a in pytree.tree_leaves(graph.output_node().args) if isinstance(a, fx.Node)}
    flow = nx.DiGraph()
    flow.add_nodes_from([_SOURCE, _SINK])
    for v in forward:
        flow.add_edge((v, "in"), (v, "out"), capacity=0 if v in outputs else _bytes(v))
        if not recomputable(v) or _rewritten_later(v, order, end):
            flow.add_edge(_SOURCE, (v, "in"))  # no capacity attribute: unbounded
        else:  # integers (max-flow is exact on them); every recomputation costs something
            flow.add_edge(_SOURCE, (v, "in"), capacity=max(1, round(recompute_cost(v))))
        for a in v.all_input_nodes:
            if a in inside:
                flow.add_edge((a, "out"), (v, "in"))
        if read_by_backward(v):
            flow.add_edge((v, "out"), _SINK)
    _, (source_side, _) = nx.minimum_cut(flow, _SOURCE, _SINK)
    return {v for v in forward if (v, "in") in source_side and (v, "out") not in source_side}


def recompute_in_backward(graph: fx.Graph, saved: set[fx.Node]) -> tuple[int, list[fx.Node]]:
    """Rebuild each forward value the backward reads and `saved` lacks, just before its first
    backward reader, from saved values and resident tensors. Returns how many such values there
    were and the clones (role "backward", marked "recomputed"); a node several recomputations
    need is cloned once."""
    order = {n: i for i, n in enumerate(graph.nodes)}

    def first_reader(v: fx.Node) -> int:
        return min(order[u] for u in read_by_backward(v))

    needed = [v for v in _forward(graph) if v not in saved and read_by_backward(v)]
    needed.sort(key=first_reader)
    env: dict[fx.Node, fx.Node] = {}
    clones: list[fx.Node] = []
    at = None
    for value in needed:
        users = read_by_backward(value)
        first = min(users, key=order.__getitem__)
        if first is not at:  # clones are shared only at one place: a clone kept for a later
            env, at = {}, first  # reader would stay alive across the backward in between
        chain = _chain(value, saved, env)
        with graph.inserting_before(first):
            for node in sorted(chain, key=order.__getitem__):
                clone = graph.node_copy(node, lambda a: env.get(a, a))
                clone.meta = {**node.meta, "sparsec": {**node.meta.get("sparsec", {}),
                                                        "role": "backward", "recomputed": True}}
                env[node] = clone
                clones.append(clone)
        for u in users:
            u.replace_input_with(value, env[value])
    return len(needed), clones


def _chain(value: fx.Node, saved: set[fx.Node], env: dict[fx.Node, fx.Node]) -> set[fx.Node]:
    """The forward nodes to repeat for `value`, stopping at saved values, resident tensors and
    nodes already recomputed."""
    chain: set[fx.Node] = set()
    stack = [value]
    while stack:
        node = stack.pop()
        if node in chain or node in env:
            continue
        chain.add(node)
        for a in node.all_input_nodes:
            if role(a) == "forward" and a.op == "call_function" and a not in saved:
                stack.append(a)
    return chain

"""Passes on the joint graph (stage 2) that cut what sparse training does not need.

- `prune-backward`: remove every gradient computation whose result no update needs (frozen
  weights' gradients, input gradients before the first trainable op, frozen bias gradients),
  switching off unused outputs of multi-output backward ops (`output_mask`).
- `optimizer-in-backward`: apply each parameter's update as soon as its gradient exists (and
  after the last read of the parameter), so the gradient is freed at once.

Each reports its counts and the predicted peak memory before and after.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import fx

from ..memory import predict_peak, saved_activations
from ..program import Program, Prop
from .base import Pass, PassResult, register

__all__ = ["PruneBackward", "OptimizerInBackward", "matmul_flops", "role", "mutates",
           "readers"]

_JOINT = frozenset({Prop.JOINT_GRAPH})
_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default}


def role(node: fx.Node) -> str | None:
    return node.meta.get("sparsec", {}).get("role")


def matmul_flops(nodes: Iterable[fx.Node]) -> int:
    """2·m·n·k summed over the matrix products among `nodes` (from their output shapes)."""
    total = 0
    for n in nodes:
        if n.target not in _MATMULS:
            continue
        a = n.args[1] if n.target is torch.ops.aten.addmm.default else n.args[0]
        out, lhs = n.meta.get("val"), getattr(a, "meta", {}).get("val")
        if isinstance(out, torch.Tensor) and isinstance(lhs, torch.Tensor):
            total += 2 * out.numel() * lhs.shape[-1]
    return total


@register
@dataclass(frozen=True)
class PruneBackward(Pass):
    """Remove every gradient computation whose result no trainable value needs.

    The joint graph is traced as full fine-tuning computes it; this pass keeps only the
    gradients that reach an optimizer update: frozen weights' and biases' gradients go, and so
    do input gradients upstream of the first trainable op. Multi-output backward ops (layer
    norm, convolution, sparsec's own) get their unused outputs switched off.
    """

    name = "prune-backward"
    summary = "remove gradient computations no trainable value needs"
    requires = _JOINT
    establishes = frozenset({Prop.BACKWARD_PRUNED})

    def run(self, program: Program) -> PassResult:
        gm = program.gm
        before_nodes = len(gm.graph.nodes)
        before = _snapshot(gm)
        masked = 0
        while True:
            masked_now = _mask_unused_outputs(gm.graph)
            removed = _dce(gm.graph)
            masked += masked_now
            if not masked_now and not removed:
                break
        gm.recompile()
        after = _snapshot(gm)
        gone = before_nodes - len(gm.graph.nodes)
        stats = {
            "nodes_removed": gone,
            "backward_nodes": f"{before['backward']} -> {after['backward']}",
            "frozen_grads_removed": before["grads"] - after["grads"],
            "outputs_masked": masked,
            "matmul_flops_removed": before["flops"] - after["flops"],
            "saved_bytes": f"{before['saved']} -> {after['saved']}",
            "predicted_peak_bytes": f"{before['peak']} -> {after['peak']}",
        }
        return PassResult(modified=gone > 0 or masked > 0, stats=stats)


def _snapshot(gm: fx.GraphModule) -> dict[str, int]:
    nodes = list(gm.graph.nodes)
    return {"backward": sum(role(n) == "backward" for n in nodes),
            "grads": sum(bool(n.meta.get("sparsec", {}).get("grad_of")) for n in nodes),
            "saved": sum(saved_activations(gm).values()),
            "flops": matmul_flops(nodes),
            "peak": predict_peak(gm).peak_bytes}


def _dce(graph: fx.Graph) -> int:
    before = len(graph.nodes)
    graph.eliminate_dead_code()
    return before - len(graph.nodes)


def _mask_unused_outputs(graph: fx.Graph) -> int:
    """Set output_mask[i] = False where output i of a multi-output op is never read."""
    changed = 0
    for node in graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None:
            continue
        names = [a.name for a in schema.arguments]
        if "output_mask" not in names:
            continue
        i = names.index("output_mask")
        mask = list(node.args[i] if i < len(node.args) else node.kwargs["output_mask"])
        used = {u.args[1] for u in node.users if u.target is operator.getitem}
        new = [bool(m) and k in used for k, m in enumerate(mask)]
        if new != mask:
            if i < len(node.args):
                node.args = (*node.args[:i], new, *node.args[i + 1:])
            else:
                node.kwargs = {**node.kwargs, "output_mask": new}
            changed += 1
    return changed


# optimizer-in-backward ------------------------------------------------------------------------
@register
@dataclass(frozen=True)
class OptimizerInBackward(Pass):
    """Apply each update as soon as its gradient exists, and free the gradient.

    Each parameter's update ops move to just after the last of their inputs (the gradient,
    the optimizer state) and after the last node that still reads the parameter, so the
    in-place update never changes a value the backward needs. Gradients then live only
    until their update, not until the end of the step.
    """

    name = "optimizer-in-backward"
    summary = "apply each update as soon as its gradient exists"
    requires = _JOINT

    def run(self, program: Program) -> PassResult:
        gm = program.gm
        peak_before = predict_peak(gm).peak_bytes
        groups: dict[str, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            if role(node) == "optimizer":
                groups.setdefault(node.meta["sparsec"].get("param") or "", []).append(node)
        moved = 0
        while True:  # a group that moves can free the way for one before it
            now = sum(_move_group(gm.graph, nodes) for name, nodes in groups.items()
                      if name != "optim.step")
            moved += now
            if not now:
                break
        gm.recompile()
        peak_after = predict_peak(gm).peak_bytes
        return PassResult(modified=moved > 0, stats={
            "updates_moved": moved,
            "predicted_peak_bytes": f"{peak_before} -> {peak_after}"})


def _move_group(graph: fx.Graph, group: list[fx.Node]) -> int:
    """Move `group` (in order) to the earliest place its inputs and readers allow."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    members = set(group)
    written = {n.args[0] for n in group if mutates(n) and isinstance(n.args[0], fx.Node)}
    barrier = max((order[r] for w in written for r in readers(w) if r not in members),
                  default=-1)
    external = [a for n in group for a in n.all_input_nodes if a not in members]
    # read-after-write: inputs that other nodes update in place (the step count) must be read
    # after those updates
    writes = [order[r] for a in external for r in readers(a) if r not in members and mutates(r)]
    earliest = max([barrier, *writes, *(order[a] for a in external)])
    nodes = list(graph.nodes)
    # only moves past real work count: hopping over other updates would just swap places
    if all(role(n) == "optimizer" for n in nodes[earliest + 1:order[group[0]]]):
        return 0
    anchor = nodes[earliest]
    for node in group:
        anchor.append(node)
        anchor = node
    return 1


def mutates(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return bool(schema and schema.arguments and schema.arguments[0].alias_info is not None
                and schema.arguments[0].alias_info.is_write)


def readers(node: fx.Node) -> set[fx.Node]:
    """Every node that reads `node` or a view of it."""
    out, stack = set(), [node]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u in out:
                continue
            out.add(u)
            schema = getattr(u.target, "_schema", None)
            if schema and schema.returns and schema.returns[0].alias_info is not None:
                stack.append(u)  # a view: its readers read `node` too
    return out

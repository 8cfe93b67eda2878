"""`merge-sparse`: fold sparse fine-tuning ops back into plain `aten.linear` with merged weights.

After it the program has the base architecture and no extra parameters or buffers: W becomes
W + Δ (`delta`, `structured`) or W ⊙ mask (`nm`). The ONNX backend runs it on a copy before
export, so deployed models carry trained deltas in their dense weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ..ops.nm import apply_nm
from ..ops.sparse_delta import apply_delta
from ..ops.structured import apply_structured
from ..program import Program, Prop
from .base import Pass, PassResult, register
from .sparse_finetune import FINETUNE_OPS, finetune_nodes

__all__ = ["MergeSparse", "merge_sparse_ops", "merged_for_export", "merged_weight"]


@register
@dataclass(frozen=True)
class MergeSparse(Pass):
    """Replace every sparse fine-tuning op by `aten.linear` on its merged dense weight.

    The merged weight is computed exactly as the op computes it, so outputs do not change.
    """

    name = "merge-sparse"
    summary = "fold sparse deltas / N:M masks into dense weights (deployment)"
    invalidates = frozenset({Prop.SPARSE_PARAMETERS})

    def run(self, program: Program) -> PassResult:
        merged = merge_sparse_ops(program)
        return PassResult(modified=merged > 0, stats={"merged": merged})


def merged_weight(program: Program, node: fx.Node) -> torch.Tensor:
    """The dense weight a sparse fine-tuning node computes with."""
    method = FINETUNE_OPS[node.target]
    get = program.get_tensor
    w = get(node.args[1].target).detach()
    if method == "delta":
        return apply_delta(w, get(node.args[3].target), get(node.args[4].target).detach())
    if method == "structured":
        return apply_structured(w, get(node.args[3].target), get(node.args[4].target).detach(),
                                node.args[5])
    return apply_nm(w, node.args[3], node.args[4])


def merge_sparse_ops(program: Program) -> int:
    """Merge in place; returns how many ops were merged."""
    graph = program.gm.graph
    nodes = finetune_nodes(program)
    for node in nodes:
        weight = program.gm.get_parameter(node.args[1].target)
        with torch.no_grad():
            weight.copy_(merged_weight(program, node))
        extra = [a for a in node.args[3:] if isinstance(a, fx.Node)]
        with graph.inserting_before(node):
            linear = graph.call_function(torch.ops.aten.linear.default, tuple(node.args[:3]))
        linear.meta.update({k: v for k, v in node.meta.items() if k != "sparsec"})
        node.replace_all_uses_with(linear)
        graph.erase_node(node)
        for a in extra:
            if a.op == "get_attr" and not a.users:
                graph.erase_node(a)
                _delete_attr(program.gm, a.target)
    if nodes:
        program.state.pop("sparse_finetune", None)
        program.state.get("report", {}).pop("sparse_finetune", None)
        program.gm.recompile()
    return len(nodes)


def merged_for_export(program: Program) -> tuple[Program, int]:
    """`program` itself when it has no sparse fine-tuning ops, else a merged copy."""
    if not finetune_nodes(program):
        return program, 0
    copy = program.copy()
    return copy, merge_sparse_ops(copy)


def _delete_attr(root: torch.nn.Module, qualname: str) -> None:
    *parents, leaf = qualname.split(".")
    mod = root
    for part in parents:
        mod = getattr(mod, part)
    delattr(mod, leaf)

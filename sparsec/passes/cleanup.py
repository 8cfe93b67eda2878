"""Passes that keep the graph tidy and set which parameters train."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from ..program import Program
from .base import Pass, PassResult, option, register

__all__ = ["DeadCode", "Freeze"]


@register
@dataclass(frozen=True)
class DeadCode(Pass):
    """Remove nodes whose results nothing uses, and parameters no node reads."""

    name = "dead-code"
    summary = "remove unused nodes and parameters"

    def run(self, program: Program) -> PassResult:
        graph = program.gm.graph
        before = len(graph.nodes)
        graph.eliminate_dead_code()
        unused = [n for n in graph.nodes if n.op == "get_attr" and not n.users]
        for n in unused:
            graph.erase_node(n)
        program.gm.delete_all_unused_submodules()
        removed = before - len(graph.nodes)
        return PassResult(modified=removed > 0, stats={"nodes_removed": removed})


@register
@dataclass(frozen=True)
class Freeze(Pass):
    """Freeze every parameter, except those whose name matches one of `trainable` (globs).

    Freezing is the baseline of sparse fine-tuning: it sets `requires_grad`, nothing else.
    """

    name = "freeze"
    summary = "freeze parameters (all, or all but the `trainable` globs)"
    trainable: tuple[str, ...] = option((), "glob patterns of parameter names that stay trainable")

    @classmethod
    def hypothesis_options(cls):
        from hypothesis import strategies as st

        globs = st.sampled_from([("*",), ("*.weight",), ("*.bias",), ("blocks.0.*",)])
        return st.fixed_dictionaries({"trainable": globs})

    def run(self, program: Program) -> PassResult:
        changed = kept = 0
        for name, p in program.gm.named_parameters():
            train = any(fnmatch.fnmatchcase(name, g) for g in self.trainable)
            changed += int(p.requires_grad != train)
            kept += int(train)
            p.requires_grad_(train)
        return PassResult(modified=changed > 0, stats={"frozen_changed": changed,
                                                       "trainable_tensors": kept})

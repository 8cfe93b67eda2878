"""Attention masks in the graph: split into conjuncts, constants evaluated, causality proven.

An element mask is kept as `MaskParts`: attend iff every `keeps` node is True and no `fills`
node is, with `biases` added to the scores. Float masks of the form where(keep, 0, −big) become
keeps; NOTs turn fills into keeps; ANDs split into their factors. Conjuncts that depend on no
input and no parameter are evaluated: all-true ones are dropped, and ones that prove the
attention causal become `causal=True` (dropped when they are exactly the causal triangle).
Whatever depends on the inputs (a padding mask) stays, for the op to apply on top of a layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

__all__ = ["MaskParts", "GraphFacts", "NoMatch", "mask_from_tensor", "normalize_mask",
           "fold_constant_masks", "MASK_FILL_MAX"]

aten = torch.ops.aten
# A fill or additive value at most this (or −inf) removes a key from the softmax in float32.
MASK_FILL_MAX = -1e4
_AND = {aten.__and__.Tensor, aten.bitwise_and.Tensor, aten.logical_and.default}
_NOT = {aten.bitwise_not.default, aten.logical_not.default}
_BOOL_PASS = {aten.expand.default, aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default,
              aten.clone.default, aten.contiguous.default, aten.alias.default}


def _val(node: Any) -> torch.Tensor | None:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


class NoMatch(Exception):
    """A matcher's refusal: `reason` says why the candidate is not rewritten (the report's
    skip reason), `node` where, when it is not the candidate itself. Raised anywhere in the
    matching, caught once by `find_sites`."""

    def __init__(self, reason: str, node: fx.Node | None = None):
        super().__init__(reason)
        self.reason, self.node = reason, node


@dataclass
class MaskParts:
    """An element mask as conjuncts: attend iff all `keeps`, no `fills`, plus added `biases`."""

    keeps: list[fx.Node] = field(default_factory=list)      # bool, True = attend
    fills: list[fx.Node] = field(default_factory=list)      # bool, True = masked out
    biases: list[tuple[fx.Node, float]] = field(default_factory=list)  # float · factor, added
    # constant float masks whose entries are 0 or remove the key: candidates for `causal`
    # (`causal_from_constants` folds them or moves them back to `biases`)
    const_floats: list[tuple[fx.Node, float]] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.keeps or self.fills or self.biases)

    def describe(self) -> str:
        parts = [f"keep {n.name}" for n in self.keeps] + [f"not {n.name}" for n in self.fills]
        parts += [f"add {n.name}" for n, _ in self.biases]
        return ", ".join(parts) or "none"


# facts about the graph ----------------------------------------------------------------------
class GraphFacts:
    """Which nodes depend on inputs or parameters, and values of the constant ones."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        params = {n for n, _ in gm.named_parameters()}
        self.on_input: set[fx.Node] = set()    # depends on an input, its values or its shape
        self.on_values: set[fx.Node] = set()   # depends on an input's values
        self.on_param: dict[fx.Node, str] = {}
        for n in gm.graph.nodes:
            if n.op == "placeholder" or n.op == "call_module":
                self.on_input.add(n)
                self.on_values.add(n)
            if n.op == "get_attr" and n.target in params:
                self.on_param[n] = n.target
            for a in n.all_input_nodes:
                if a in self.on_input:
                    self.on_input.add(n)
                if a in self.on_values and not _is_size(n):
                    self.on_values.add(n)
                if a in self.on_param and n not in self.on_param:
                    self.on_param[n] = self.on_param[a]
        self._values: dict[fx.Node, Any] = {}
        self._bumped: dict[fx.Node, Any] = {}

    def constant(self, node: Any) -> bool:
        return not isinstance(node, fx.Node) or (node not in self.on_input and
                                                 node not in self.on_param)

    def shape_constant(self, node: Any) -> bool:
        """No parameter and no input value behind it: at most input *shapes* (a mask made
        from arange(batch) under a symbolic batch, say)."""
        return not isinstance(node, fx.Node) or (node not in self.on_values and
                                                 node not in self.on_param)

    def value(self, node: Any, bump: int = 0) -> Any:
        """Evaluate a (shape-)constant node; input sizes take their traced values, plus
        `bump` for symbolic ones (to check that a fact holds for other sizes too)."""
        if not isinstance(node, fx.Node):
            return node
        cache = self._bumped if bump else self._values
        if node in cache:
            return cache[node]
        if _is_size(node):
            out = _size_hint(node) + (bump if _symbolic(node) else 0)
        elif node.op == "get_attr":
            out = _get_attr(self.gm, node.target)
        elif node.op == "call_function":
            args = fx.node.map_arg(node.args, lambda a: self.value(a, bump))
            kwargs = fx.node.map_arg(node.kwargs, lambda a: self.value(a, bump))
            with torch.no_grad():
                out = node.target(*args, **kwargs)
        else:
            raise ValueError(f"cannot evaluate {node.op} node {node.name}")
        cache[node] = out
        return out

    def scalar(self, arg: Any) -> float | None:
        """The value of a constant scalar (a number or a one-element constant tensor)."""
        if isinstance(arg, (int, float)) and not isinstance(arg, bool):
            return float(arg)
        if isinstance(arg, fx.Node) and self.constant(arg):
            try:
                val = self.value(arg)
            except Exception:
                return None
            if isinstance(val, torch.Tensor) and val.numel() == 1 and val.is_floating_point():
                return float(val)
            if isinstance(val, (int, float)):
                return float(val)
        return None


def _is_size(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is aten.sym_size.int


def _symbolic(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.SymInt)


def _size_hint(node: fx.Node) -> int:
    val = node.meta.get("val")
    if isinstance(val, torch.SymInt):
        return int(val.node.hint)
    if isinstance(val, int):
        return val
    ph, dim = node.args[0], node.args[1]
    return int(ph.meta["val"].shape[dim])


def _get_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# normalizing -------------------------------------------------------------------------------
def mask_from_tensor(mask: fx.Node, facts: GraphFacts, normalize: Any = None) -> MaskParts:
    """SDPA's attn_mask as `MaskParts` (bool: a keep; float: a bias), normalized by
    `normalize` (default `normalize_mask`)."""
    val = _val(mask)
    if val is None:
        raise NoMatch("attn_mask has no traced shape")
    parts = MaskParts()
    if val.dtype == torch.bool:
        parts.keeps.append(mask)
    else:
        parts.biases.append((mask, 1.0))
    return (normalize or normalize_mask)(parts, facts)


def normalize_mask(parts: MaskParts, facts: GraphFacts) -> MaskParts:
    """Normalize: float masks of the form where(keep, 0, −big) become keeps, NOTs flip fills
    into keeps, ANDs split into conjuncts; learned biases are refused."""
    out = MaskParts()
    for node, factor in parts.biases:
        keep = _where_keep(node, facts)
        if keep is not None:
            out.keeps.extend(_conjuncts(keep))
            continue
        if _mask_like_constant(node, factor, facts):
            out.const_floats.append((node, factor))
            continue
        if node in facts.on_param:
            raise NoMatch(f"the attention bias {node.name} depends on parameter "
                          f"'{facts.on_param[node]}' (a learned bias); the block-sparse op "
                          "treats masks as constants")
        out.biases.append((node, factor))
    for node in parts.keeps:
        out.keeps.extend(_conjuncts(node))
    for node in parts.fills:
        if node.target in _NOT:
            out.keeps.extend(_conjuncts(node.args[0]))
        else:
            out.fills.append(node)
    return out


def _mask_like_constant(node: fx.Node, factor: float, facts: GraphFacts) -> bool:
    """A constant float mask whose entries are 0 or remove the key (after `factor`)."""
    if not facts.constant(node) or factor <= 0:
        return False
    try:
        val = facts.value(node)
    except Exception:
        return False
    if not isinstance(val, torch.Tensor) or not val.is_floating_point():
        return False
    return bool(((val == 0) | (val * factor <= MASK_FILL_MAX)).all())


def _where_keep(node: fx.Node, facts: GraphFacts) -> fx.Node | None:
    """cond if node is where(cond, 0, v ≤ MASK_FILL_MAX), else None."""
    while node.target in _BOOL_PASS and node.target is not aten.expand.default and \
            _val(node) is not None and _val(node).is_floating_point():
        node = node.args[0]
    if node.target not in (aten.where.self, aten.where.ScalarOther):
        return None
    zero, fill = facts.scalar(node.args[1]), facts.scalar(node.args[2])
    if zero == 0.0 and fill is not None and fill <= MASK_FILL_MAX:
        return node.args[0]
    return None


def _conjuncts(node: fx.Node) -> list[fx.Node]:
    """Split a bool mask through AND (and shape/bool-cast no-ops) into its factors."""
    val = _val(node)
    if node.target in _AND:
        return _conjuncts(node.args[0]) + _conjuncts(node.args[1])
    if node.target in _BOOL_PASS and val is not None and val.dtype == torch.bool and \
            isinstance(node.args[0], fx.Node) and _val(node.args[0]) is not None and \
            _val(node.args[0]).dtype == torch.bool:
        return _conjuncts(node.args[0])
    return [node]


def fold_constant_masks(mask: MaskParts, facts: GraphFacts, q_len: int, kv_len: int) -> bool:
    """Drop constant all-true conjuncts; return True when the constant ones prove causality
    (they are dropped too when they are exactly the causal triangle).

    Constant here means made of no parameter and no input *value*: a mask built from the
    inputs' shapes (HF's masks under a symbolic batch) counts, and is checked at the traced
    sizes and again at sizes one larger, so a fact that holds only at one batch size is not
    taken for a constant one."""
    floats = dict(mask.const_floats)
    mask.const_floats = []
    try:
        return _fold_constants(mask, facts, floats, q_len, kv_len)
    finally:  # constant float masks not folded stay exact additive masks
        mask.biases += list(floats.items())


def _fold_constants(mask: MaskParts, facts: GraphFacts, floats: dict[fx.Node, float],
                    L: int, S: int) -> bool:
    keeps = [n for n in mask.keeps if facts.shape_constant(n)]
    fills = [n for n in mask.fills if facts.shape_constant(n)]
    nodes = keeps + fills + list(floats)
    sized = any(n in facts.on_input for n in nodes)
    views = [_keep_values(facts, keeps, fills, floats, 0)]
    if sized:
        views.append(_keep_values(facts, keeps, fills, floats, 1))
    if any(v is None for v in views):
        return False  # a constant we cannot evaluate stays an element mask
    ones = [n for n in nodes if all(bool(v[n].all()) for v in views)]
    rest = [n for n in nodes if n not in ones]
    _drop(mask, floats, ones)
    if not rest or L != S:
        return False
    verdicts = [_causal(v, rest) for v in views]
    if None in verdicts:
        return False
    if all(v == "exact" for v in verdicts):  # exactly causal: causal=True says it all
        _drop(mask, floats, rest)
    return True


def _keep_values(facts: GraphFacts, keeps: list, fills: list, floats: dict,
                 bump: int) -> dict[fx.Node, torch.Tensor] | None:
    """Each constant conjunct as a bool keep tensor (True = attend), or None if one cannot
    be evaluated or is not a bool mask."""
    try:
        out = {n: facts.value(n, bump) for n in keeps}
        out.update({n: ~facts.value(n, bump) for n in fills})
        out.update({n: facts.value(n, bump) == 0 for n in floats})
    except Exception:
        return None
    if any(not isinstance(v, torch.Tensor) or v.dtype != torch.bool for v in out.values()):
        return None
    return out


def _causal(values: dict[fx.Node, torch.Tensor], nodes: list[fx.Node]) -> str | None:
    """'exact' when the conjuncts together are the causal triangle, 'within' when they only
    keep entries inside it, None otherwise (or when they differ across batch and heads)."""
    if any(values[n].dim() < 2 for n in nodes):
        return None
    try:
        shape = torch.broadcast_shapes(*(values[n].shape for n in nodes))
    except RuntimeError:
        return None
    L, S = shape[-2:]
    if L != S:
        return None
    total = torch.ones(L, S, dtype=torch.bool, device=values[nodes[0]].device)
    for n in nodes:
        v = values[n].to(total.device)
        v2 = v.expand(*v.shape[:-2], L, S).reshape(-1, L, S)
        if not bool((v2 == v2[:1]).all()):
            return None  # differs across batch/heads: leave it as an element mask
        total = total & v2[0]
    tril = torch.ones(L, S, dtype=torch.bool, device=total.device).tril()
    if bool((total & ~tril).any()):
        return None
    return "exact" if bool((total == tril).all()) else "within"


def _drop(mask: MaskParts, floats: dict, nodes: list[fx.Node]) -> None:
    mask.keeps = [n for n in mask.keeps if n not in nodes]
    mask.fills = [n for n in mask.fills if n not in nodes]
    for n in nodes:
        floats.pop(n, None)

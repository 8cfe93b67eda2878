"""Find attention in an ATen forward graph: `Site`s to rewrite and `Skip`s with their reason.

Two forms are matched:

- `aten.scaled_dot_product_attention` (attn_mask, is_causal, scale, enable_gqa);
- hand-written attention: matmul/bmm(q, kᵀ) → scale (mul/div by a constant, on the scores or
  on q) → optional soft-cap (tanh between constant scales, as Gemma 2 writes it:
  ·/c → tanh → ·c) → mask (add, masked_fill, where) → softmax over the last dim → casts /
  eval dropout → matmul/bmm(·, v), as GPT-2, BERT and older Hugging Face models write it.

Keys and values repeated for grouped-query attention (repeat_interleave on the head dim, or
unsqueeze → expand → reshape as Hugging Face's `repeat_kv`) are traced back to their key/value
heads. Masks are split into conjuncts: the parts that depend on no input are evaluated, and a
constant causal part becomes `causal=True`; the rest (a padding mask, say) stays an element
mask the op applies on top of the layout. A float bias computed from a parameter (T5's
relative-position bias) stays one additive mask, an input of the op, so it gets its gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from ..program import module_path
from .attention_masks import (
    MASK_FILL_MAX,
    GraphFacts,
    MaskParts,
    NoMatch,
    fold_constant_masks,
    mask_from_tensor,
    normalize_mask,
)

__all__ = ["Site", "SiteCall", "Skip", "NoMatch", "find_sites", "unrepeat_kv"]

aten = torch.ops.aten

_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
_MATMUL = {aten.matmul.default, aten.bmm.default}
_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default,
          aten.contiguous.default, aten.alias.default, aten.type_as.default, aten.to.device}
_MUL = {aten.mul.Tensor, aten.mul.Scalar}
_DIV = {aten.div.Tensor, aten.div.Scalar}
_ADD = {aten.add.Tensor}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
# Nodes that only check a value (torch.export inserts them after casts): not real users.
_CHECKS = {aten._assert_tensor_metadata.default}


def _users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if u.target not in _CHECKS]


def _checks(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if u.target in _CHECKS]


@dataclass
class Site:
    """One attention to rewrite: out = attention(q, k, v) under `mask` (and `causal`)."""

    node: fx.Node                 # the node whose value the op replaces
    kind: str                     # "sdpa" | "manual"
    q: fx.Node
    k: fx.Node                    # [B, Hkv, S, D] (or kᵀ when `k_transposed`)
    v: fx.Node
    scale: float
    causal: bool
    mask: MaskParts
    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    three_d: bool = False         # bmm form: [B·H, L, D], heads folded into the batch
    k_transposed: bool = False    # `k` holds kᵀ: the replacement transposes it back
    gqa: str | None = None        # how k/v were repeated, if they were
    dead: list[fx.Node] = field(default_factory=list)
    softcap: float = 0.0          # scores → softcap · tanh(scores / softcap) before the mask

    @property
    def name(self) -> str:
        return module_path(self.node) or self.node.name

    def shape_inputs(self, q, k, v):
        """q, k, v as the op takes them: k untransposed, heads as their own dimension."""
        if self.k_transposed:
            k = k.transpose(-1, -2)
        if self.three_d:
            q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
        return q, k, v

    def shape_output(self, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The op's output in the replaced node's shape and dtype."""
        if self.three_d:
            out = out.squeeze(1)
        return out if out.dtype == dtype else out.to(dtype)

    def build_mask(self, keeps, fills, biases, factors) -> torch.Tensor | None:
        """The element mask in SDPA form (bool keep, float bias, or a float with −inf)."""
        keep = None
        for m in keeps:
            keep = m if keep is None else keep & m
        for m in fills:
            keep = ~m if keep is None else keep & ~m
        bias = None
        for m, f in zip(biases, factors):
            term = m if f == 1.0 else m * f
            bias = term if bias is None else bias + term
        if keep is not None and self.three_d and keep.dim() == 3:
            keep = keep.unsqueeze(1)
        if bias is not None and self.three_d and bias.dim() == 3:
            bias = bias.unsqueeze(1)
        if bias is None:
            return keep
        if keep is None:
            return bias
        return bias.masked_fill(~keep, float("-inf"))


@dataclass
class SiteCall:
    """The graph inputs of a site's replacement, in order — q, k, v, the layout's tensors (a
    static layout's block tensors, a learned one's gate weights, or the reference's element
    mask; none for a selection made from q and k), then the element mask's keeps, fills and
    biases — and how the replacement function gets them back as tensors."""

    site: Site
    layout: list[fx.Node] = field(default_factory=list)

    def inputs(self) -> list[fx.Node]:
        s, m = self.site, self.site.mask
        return [s.q, s.k, s.v, *self.layout, *m.keeps, *m.fills, *[n for n, _ in m.biases]]

    def unpack(self, q, k, v, *rest) -> tuple[Any, Any, Any, list, Any]:
        """(q, k, v as the op takes them, the layout's tensors, the element mask or None)."""
        s, m = self.site, self.site.mask
        n, nk, nf = len(self.layout), len(m.keeps), len(m.fills)
        lay, rest = list(rest[:n]), rest[n:]
        q, k, v = s.shape_inputs(q, k, v)
        mask = s.build_mask(rest[:nk], rest[nk:nk + nf], rest[nk + nf:],
                            [f for _, f in m.biases])
        return q, k, v, lay, mask


@dataclass
class Skip:
    node: fx.Node
    reason: str

    @property
    def name(self) -> str:
        return module_path(self.node) or self.node.name


def _val(node: Any) -> torch.Tensor | None:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


# entry --------------------------------------------------------------------------------------
def find_sites(gm: fx.GraphModule) -> list[Site | Skip]:
    """Every attention candidate of the graph, in graph order."""
    facts = GraphFacts(gm)
    out: list[Site | Skip] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.meta.get("sparsec", {}).get("inserted_by"):
            continue  # (a learned gate's softmax is not an attention to rewrite)
        if node.target is aten.scaled_dot_product_attention.default:
            match = _match_sdpa
        elif node.target in _SOFTMAX and _looks_like_attention(node):
            match = _match_manual
        else:
            continue
        try:
            out.append(match(node, facts))
        except NoMatch as e:
            out.append(Skip(node, e.reason))
    return out


def _looks_like_attention(softmax: fx.Node) -> bool:
    """A softmax is an attention candidate if a matmul feeds it or consumes it."""
    x, steps = softmax.args[0], 0
    while isinstance(x, fx.Node) and steps < 8:
        if x.target in _MATMUL:
            return True
        x, steps = (x.args[0] if x.args else None), steps + 1
    users, steps = _users(softmax), 0
    while len(users) == 1 and steps < 4:
        if users[0].target in _MATMUL:
            return True
        users, steps = _users(users[0]), steps + 1
    return False


# scaled_dot_product_attention ---------------------------------------------------------------
def _match_sdpa(node: fx.Node, facts: GraphFacts) -> Site:
    q, k, v = node.args[:3]
    attn_mask = _arg(node, 3, "attn_mask")
    dropout_p = _arg(node, 4, "dropout_p", 0.0)
    is_causal = bool(_arg(node, 5, "is_causal", False))
    scale = node.kwargs.get("scale", _arg(node, 6, "scale"))
    enable_gqa = bool(node.kwargs.get("enable_gqa", False))
    if dropout_p:
        raise NoMatch(f"dropout_p={dropout_p} (training-mode dropout): the block-sparse op "
                      "has no dropout; trace the model in eval mode")
    b, h, L, d, S = _shapes(node, q, k, v)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    mask = MaskParts()
    if attn_mask is not None:
        mask = mask_from_tensor(attn_mask, facts, _normalize)
    site = Site(node, "sdpa", q, k, v, scale, is_causal, mask, b, h, _val(k).shape[1], L, S,
                d, gqa="enable_gqa" if enable_gqa and _val(k).shape[1] != h else None)
    return _finish(site, facts)


def _shapes(node: fx.Node, q: Any, k: Any, v: Any) -> tuple[int, int, int, int, int]:
    vals = [_val(x) for x in (q, k, v)]
    if any(not isinstance(t, torch.Tensor) for t in vals):
        raise NoMatch("q, k or v has no traced shape (node.meta['val'])")
    qv, kv, vv = vals
    if qv.dim() != 4 or kv.dim() != 4 or vv.dim() != 4:
        raise NoMatch(f"q/k/v are {qv.dim()}-D; attention with [batch, heads, length, dim] "
                      "is matched")
    if not (qv.shape[0] == kv.shape[0] == vv.shape[0]):
        raise NoMatch("q, k and v have different batch sizes (broadcast batch is not "
                      "supported)")
    if kv.shape[1] != vv.shape[1] or qv.shape[1] % kv.shape[1]:
        raise NoMatch(f"{qv.shape[1]} query heads do not group onto {kv.shape[1]} key/value "
                      "heads")
    if not qv.is_floating_point():
        raise NoMatch(f"q is {qv.dtype}")
    return qv.shape[0], qv.shape[1], qv.shape[2], qv.shape[3], kv.shape[2]


# hand-written attention -------------------------------------------------------------------
def _match_manual(softmax: fx.Node, facts: GraphFacts) -> Site:
    dim = softmax.args[1] if len(softmax.args) > 1 else softmax.kwargs.get("dim")
    scores_val = _val(softmax)
    if scores_val is None:
        raise NoMatch("softmax has no traced shape")
    if dim not in (-1, scores_val.dim() - 1):
        raise NoMatch(f"softmax over dim {dim}, not the key dim (last)")
    out_mm, v, tail = _walk_probabilities(softmax)
    mm, scale, mask, chain, softcap = _walk_scores(softmax, facts)
    q, k_node, k_transposed, q_scale, peeled = _split_qk(mm, facts)
    scale *= q_scale
    three_d = _val(q).dim() == 3
    mask = _normalize(mask, facts)
    qv, kv, vv = _val(q), _val(k_node), _val(v)
    if qv.dim() not in (3, 4) or vv.dim() != qv.dim():
        raise NoMatch(f"q is {qv.dim()}-D; 3-D (bmm) and 4-D attention are matched")
    L, d = qv.shape[-2], qv.shape[-1]
    S = kv.shape[-1] if k_transposed else kv.shape[-2]
    if three_d:
        b, h, hkv = qv.shape[0], 1, 1
    else:
        b, h, hkv = qv.shape[0], qv.shape[1], kv.shape[1]
    if tuple(_val(mm).shape[-2:]) != (L, S) or vv.shape[-2] != S:
        raise NoMatch("scores are not [.., q_len, kv_len] of q and k")
    dead = [out_mm, *reversed(tail), softmax, *chain, mm, *peeled]
    dead = [c for n in dead for c in (*_checks(n), n)]  # assertions go before their subject
    site = Site(out_mm, "manual", q, k_node, v, scale, False, mask, b, h, hkv, L, S, d,
                three_d=three_d, k_transposed=k_transposed, dead=dead, softcap=softcap)
    return _finish(site, facts)


def _walk_probabilities(softmax: fx.Node) -> tuple[fx.Node, fx.Node, list[fx.Node]]:
    """From the softmax forward to matmul(p, v): (matmul, v, the nodes between)."""
    x, tail = softmax, []
    while True:
        users = _users(x)
        if len(users) != 1:
            who = ", ".join(u.name for u in users) or "nothing"
            raise NoMatch(f"the attention probabilities ({x.name}) are used by {who}, not "
                          "only by the value product (e.g. output_attentions=True)")
        u = users[0]
        if u.target in _MATMUL:
            if u.args[0] is not x:
                raise NoMatch("the probabilities are the right operand of the value product")
            return u, u.args[1], tail
        if u.target is aten.dropout.default:
            p, train = _arg(u, 1, "p", 0.0), _arg(u, 2, "train", False)
            if train and p:
                raise NoMatch(f"dropout p={p} in training mode on the attention probabilities")
        elif u.target not in _CASTS:
            raise NoMatch(f"{_op_name(u)} between softmax and the value product is not "
                          "supported")
        tail.append(u)
        x = u


def _walk_scores(softmax: fx.Node, facts: GraphFacts):
    """From the softmax back to matmul(q, kᵀ): (matmul, scale, mask ops, chain, softcap)."""
    x, chain, ops = softmax.args[0], [], []
    while True:
        if not isinstance(x, fx.Node):
            raise NoMatch("softmax input is not a tensor computed in the graph")
        if x.target in _MATMUL:
            break
        if len(_users(x)) != 1:
            raise NoMatch(f"the attention scores ({x.name}) are also used by another node")
        rule = _SCORE_RULES.get(x.target)
        if rule is None:
            raise NoMatch(f"{_op_name(x)} between QKᵀ and softmax (a score modification the "
                          "block-sparse op cannot express)")
        chain.append(x)
        op, x = rule(x, facts)
        if op is not None:
            ops.append(op)
    scale, mask, cap = _fold_score_ops(ops)
    return x, scale, mask, chain, cap


# One rule per op that may sit between QKᵀ and the softmax: node → (what it does to the
# scores or None, the node it reads the scores from).
def _scale_rule(x: fx.Node, facts: GraphFacts):
    mul = x.target in _MUL
    inner, c = _split_const(x, facts, allow_right_only=not mul)
    if inner is None:
        raise NoMatch(f"scores are {'multiplied' if mul else 'divided'} by a non-constant "
                      "tensor")
    return ("scale", c if mul else 1.0 / c), inner


def _bias_rule(x: fx.Node, facts: GraphFacts):
    if len(x.args) > 2 and x.args[2] != 1 or x.kwargs.get("alpha", 1) != 1:
        raise NoMatch("add with alpha ≠ 1 on the scores")
    inner, other = _pick_chain(x)
    if inner is None:
        raise NoMatch(f"cannot tell the scores from the mask in {x.name}")
    return ("bias", other), inner


def _removes_keys(value: Any, facts: GraphFacts) -> bool:
    value = facts.scalar(value)
    return value is not None and value <= MASK_FILL_MAX


def _fill_rule(x: fx.Node, facts: GraphFacts):
    if not _removes_keys(x.args[2], facts):
        raise NoMatch(f"masked_fill with {x.args[2]!r}, which does not remove keys "
                      f"(needs −inf or ≤ {MASK_FILL_MAX:g})")
    return ("fill", x.args[1]), x.args[0]


def _keep_rule(x: fx.Node, facts: GraphFacts):
    if not _removes_keys(x.args[2], facts):
        raise NoMatch("where() on the scores with a fill value that does not remove keys")
    return ("keep", x.args[0]), x.args[1]


def _cast_rule(x: fx.Node, facts: GraphFacts):
    return None, x.args[0]


def _tanh_rule(x: fx.Node, facts: GraphFacts):
    return ("tanh", None), x.args[0]


_SCORE_RULES = {
    **dict.fromkeys(_MUL | _DIV, _scale_rule),
    **dict.fromkeys(_ADD, _bias_rule),
    aten.masked_fill.Scalar: _fill_rule, aten.masked_fill.Tensor: _fill_rule,
    aten.where.self: _keep_rule, aten.where.ScalarOther: _keep_rule,
    **dict.fromkeys(_CASTS, _cast_rule),
    aten.tanh.default: _tanh_rule,
}


def _fold_score_ops(ops: list[tuple[str, Any]]) -> tuple[float, MaskParts, float]:
    """(scale, mask, softcap) of the score ops, applied in forward order: later scales also
    scale earlier biases; a tanh makes the scores a · tanh(b · qk) (+ biases): softcap |a|,
    scale a · b (tanh is odd)."""
    mask, biases = MaskParts(), []
    scale, capped, cap = 1.0, False, 1.0
    for kind, arg in reversed(ops):
        if kind == "scale":
            scale *= arg
            cap *= arg
            biases = [(n, f * arg) for n, f in biases]
        elif kind == "tanh":
            if capped:
                raise NoMatch("two tanh between QKᵀ and softmax (one soft-cap is supported)")
            if biases or mask.fills or mask.keeps:
                raise NoMatch("a mask or bias before the tanh soft-cap (the op caps the "
                              "scaled scores, then adds the mask)")
            capped, cap = True, 1.0
        elif kind == "bias":
            biases.append((arg, 1.0))
        elif kind == "fill":
            mask.fills.append(arg)
        else:
            mask.keeps.append(arg)
    mask.biases = biases
    if capped and not cap:
        raise NoMatch("the soft-capped scores are multiplied by 0")
    return scale, mask, abs(cap) if capped else 0.0


def _normalize(parts: MaskParts, facts: GraphFacts) -> MaskParts:
    """`normalize_mask`, except that float biases computed from a parameter (T5's relative
    positions) are kept whole as additive masks: the op takes them as an input and returns
    their gradient, so they train."""
    learned = [(n, f) for n, f in parts.biases if n in facts.on_param]
    parts.biases = [(n, f) for n, f in parts.biases if n not in facts.on_param]
    out = normalize_mask(parts, facts)
    out.biases += learned
    return out


def _split_const(node: fx.Node, facts: GraphFacts, allow_right_only: bool):
    a, b = node.args[0], node.args[1]
    cb = facts.scalar(b)
    if cb is not None and isinstance(a, fx.Node):
        return a, cb
    if not allow_right_only:
        ca = facts.scalar(a)
        if ca is not None and isinstance(b, fx.Node):
            return b, ca
    return None, None


def _pick_chain(add: fx.Node) -> tuple[fx.Node | None, Any]:
    """Which operand of an add carries the scores (it reaches the QKᵀ matmul)."""
    a, b = add.args[0], add.args[1]
    hits = [x for x in (a, b) if isinstance(x, fx.Node) and _reaches_matmul(x)]
    if len(hits) != 1:
        return None, None
    return (a, b) if hits[0] is a else (b, a)


def _reaches_matmul(x: fx.Node, depth: int = 12) -> bool:
    while isinstance(x, fx.Node) and depth > 0:
        if x.target in _MATMUL:
            return True
        if len(_users(x)) != 1 or not x.args:
            return False
        x, depth = x.args[0], depth - 1
    return False


def _split_qk(mm: fx.Node, facts: GraphFacts):
    """(q, k or kᵀ, whether it is kᵀ, scale folded from q/k, nodes peeled)."""
    if len(_users(mm)) != 1:
        raise NoMatch("the raw scores are used elsewhere")
    a, bt = mm.args[0], mm.args[1]
    scale, peeled = 1.0, []
    a, s, p = _peel_scale(a, facts)
    scale, peeled = scale * s, peeled + p
    nd = _val(bt).dim() if _val(bt) is not None else 0
    k, transposed = bt, True
    if bt.target is aten.transpose.int and len(_users(bt)) == 1 and \
            {d % nd for d in bt.args[1:3]} == {nd - 1, nd - 2}:
        k, transposed = bt.args[0], False
        peeled.append(bt)
    elif bt.target is aten.permute.default and len(_users(bt)) == 1 and \
            list(bt.args[1]) in (list(range(nd - 2)) + [nd - 1, nd - 2],):
        k, transposed = bt.args[0], False
        peeled.append(bt)
    k, s, p = _peel_scale(k, facts)
    scale, peeled = scale * s, peeled + p
    if not isinstance(a, fx.Node) or _val(a) is None or _val(k) is None:
        raise NoMatch("q or k has no traced shape")
    return a, k, transposed, scale, peeled


def _peel_scale(x: Any, facts: GraphFacts) -> tuple[Any, float, list[fx.Node]]:
    """q·c or q/c with a constant c and no other user: (q, c, [node])."""
    if isinstance(x, fx.Node) and len(_users(x)) == 1 and (x.target in _MUL or x.target in _DIV):
        inner, c = _split_const(x, facts, allow_right_only=x.target in _DIV)
        if inner is not None and c:
            return inner, (c if x.target in _MUL else 1.0 / c), [x]
    return x, 1.0, []


def _op_name(node: fx.Node) -> str:
    t = node.target
    return str(t.overloadpacket) if isinstance(t, torch._ops.OpOverload) else str(t)


# GQA ------------------------------------------------------------------------------------------
def unrepeat_kv(x: fx.Node, groups: int) -> tuple[fx.Node, str] | None:
    """The [B, Hkv, S, D] tensor that x repeats `groups` times per head (h → h // groups)."""
    if groups <= 1:
        return None
    val = _val(x)
    if x.target is aten.repeat_interleave.self_int:
        reps = x.args[1]
        dim = x.args[2] if len(x.args) > 2 else x.kwargs.get("dim")
        if reps == groups and dim is not None and dim % 4 == 1:
            return x.args[0], "repeat_interleave"
        return None
    if x.target not in _VIEWS:
        return None
    e = x.args[0]
    while isinstance(e, fx.Node) and e.target in (aten.clone.default, aten.contiguous.default):
        e = e.args[0]
    if not isinstance(e, fx.Node) or e.target is not aten.expand.default:
        return None
    u = e.args[0]
    if not isinstance(u, fx.Node) or u.target is not aten.unsqueeze.default or \
            u.args[1] % 5 != 2:
        return None
    base = u.args[0]
    bv, ev = _val(base), _val(e)
    if bv is None or ev is None or bv.dim() != 4 or val is None:
        return None
    b, hkv, s, d = bv.shape
    if tuple(ev.shape) != (b, hkv, groups, s, d) or tuple(val.shape) != (b, hkv * groups, s, d):
        return None
    return base, "expand"


def _finish(site: Site, facts: GraphFacts) -> Site | Skip:
    """Fold GQA repeats back to key/value heads and constant causal masks into `causal`."""
    if not site.three_d and not site.k_transposed and site.gqa is None:
        groups = site.heads // max(site.kv_heads, 1)
        if site.kv_heads == site.heads:  # maybe repeated up to the query heads
            for g in _divisors_desc(site.heads):
                rk, rv = unrepeat_kv(site.k, g), unrepeat_kv(site.v, g)
                if rk and rv and rk[1] == rv[1]:
                    site.k, site.v, site.gqa = rk[0], rv[0], rk[1]
                    site.kv_heads = site.heads // g
                    break
        elif groups > 1:
            site.gqa = "enable_gqa"
    site.causal = fold_constant_masks(site.mask, facts, site.q_len, site.kv_len) or site.causal
    return site


def _divisors_desc(n: int) -> list[int]:
    return [g for g in range(n, 1, -1) if n % g == 0]

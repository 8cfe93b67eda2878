"""Canonical forms made right after tracing, so every pass sees one shape of each idea.

`matmuls_to_linear`: a matrix product with a weight parameter becomes `aten.linear`, whatever
way the model wrote it — `addmm(b, x, W)` / `mm(x, W)` as GPT-2's `Conv1D` does (weight stored
[in, out]: the parameter is stored transposed from then on, under the same name), or
`addmm(b, x, t(W))` / `mm(x, t(W))` (weight stored [out, in] as nn.Linear's). Sparse
fine-tuning, deltas and export then treat all of them as linear layers.

`causal_attention`: an attention (SDPA or written out as softmax(q·kᵀ)·v) whose mask is a
constant causal triangle — in any form `attention_masks` proves causal: HF's bool or
`finfo.min` masks (also built from a symbolic batch), nanoGPT's `tril == 0` fill, additive
`-inf` — becomes `scaled_dot_product_attention(q, k, v, is_causal=True)` with the mask gone.
On a GPU that picks the causal flash kernels instead of a masked kernel over the whole square;
the block-sparse pass sees the same site with `causal=True`. Attention with any other mask
part (padding, a bias, soft-capping) is left as it is.
"""

from __future__ import annotations

import torch
from torch import fx

from .attention_match import Site, find_sites
from .rewrite import erase_unused, insert_traced

__all__ = ["matmuls_to_linear", "causal_attention"]

aten = torch.ops.aten
_PRODUCTS = {aten.addmm.default, aten.mm.default}
_TRANSPOSES = {aten.t.default, aten.transpose.int, aten.permute.default}


def matmuls_to_linear(gm: fx.GraphModule) -> list[str]:
    """Rewrite weight products into `aten.linear`; returns the parameters now stored
    transposed (the ones that were [in, out])."""
    uses = _attr_users(gm)
    transposed = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _PRODUCTS or node.kwargs:
            continue
        bias, x, w = node.args if node.target is aten.addmm.default else (None, *node.args)
        weight, stored_in_out = _weight_of(gm, w, uses)
        if weight is None or not _plain_bias(gm, bias):
            continue
        if stored_in_out:
            _store_transposed(gm, weight.target)
            transposed.append(weight.target)
        with gm.graph.inserting_before(node):
            args = (x, weight) if bias is None else (x, weight, bias)
            linear = gm.graph.call_function(aten.linear.default, args)
        linear.meta.update(node.meta)
        node.replace_all_uses_with(linear)
        gm.graph.erase_node(node)
        if w is not weight and not w.users:
            gm.graph.erase_node(w)
    gm.recompile()
    return transposed


def _attr_users(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    out: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            out.setdefault(n.target, []).extend(n.users)
    return out


def _weight_of(gm: fx.GraphModule, w, uses) -> tuple[fx.Node | None, bool]:
    """(the weight's get_attr, whether it is stored [in, out]), or (None, False)."""
    if not isinstance(w, fx.Node):
        return None, False
    if w.op == "get_attr" and _param_2d(gm, w.target) and len(uses[w.target]) == 1:
        return w, True
    if w.op == "call_function" and w.target in _TRANSPOSES and _swaps_2d(w):
        src = w.args[0]
        if isinstance(src, fx.Node) and src.op == "get_attr" and _param_2d(gm, src.target) \
                and uses[src.target] == [w]:
            return src, False
    return None, False


def _swaps_2d(t: fx.Node) -> bool:
    if t.target is aten.t.default:
        return True
    if t.target is aten.transpose.int:
        return sorted(d % 2 for d in t.args[1:3]) == [0, 1]
    return list(t.args[1]) in ([1, 0], [-1, -2], [1, -2], [-1, 0])


def _param_2d(gm: fx.GraphModule, name: str) -> bool:
    try:
        p = gm.get_parameter(name)
    except AttributeError:
        return False
    return p.dim() == 2 and p.is_floating_point()


def _plain_bias(gm: fx.GraphModule, bias) -> bool:
    if bias is None:
        return True
    if not isinstance(bias, fx.Node):
        return False
    val = bias.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dim() == 1


def _store_transposed(gm: fx.GraphModule, name: str) -> None:
    *parents, leaf = name.split(".")
    owner = gm.get_submodule(".".join(parents)) if parents else gm
    old = owner.get_parameter(leaf)
    new = torch.nn.Parameter(old.detach().t().contiguous(), requires_grad=old.requires_grad)
    owner.register_parameter(leaf, new)


def causal_attention(gm: fx.GraphModule) -> list[str]:
    """Rewrite attention under a constant causal mask into causal SDPA; returns the sites'
    names (module paths)."""
    sites = [s for s in find_sites(gm) if _needs_causal_sdpa(s)]
    for site in sites:
        out = insert_traced(gm, _causal_sdpa(site), [site.q, site.k, site.v],
                            before=site.node, meta_from=site.node)
        site.node.replace_all_uses_with(out)
        erase_unused(gm.graph, site.dead or [site.node])
    if sites:
        gm.recompile()
    return [s.name for s in sites]


def _needs_causal_sdpa(site) -> bool:
    if not isinstance(site, Site) or not site.causal or not site.mask.empty() or site.softcap:
        return False
    if site.kind == "sdpa":  # already canonical when it had no mask to fold
        return site.node.kwargs.get("attn_mask", site.node.args[3]
                                    if len(site.node.args) > 3 else None) is not None
    return True


def _causal_sdpa(site: Site):
    """fn(q, k, v) → causal SDPA in the replaced node's shape; k/v repeated to the query heads
    as the model had them (`expand` or `repeat_interleave`), or by `enable_gqa` when the model
    used it."""
    groups = site.heads // max(site.kv_heads, 1)
    dtype = site.node.meta["val"].dtype
    native_gqa = site.gqa == "enable_gqa"

    def fn(q, k, v):
        q, k, v = site.shape_inputs(q, k, v)
        if groups > 1 and not native_gqa:
            k, v = _repeat_heads(k, groups, site.gqa), _repeat_heads(v, groups, site.gqa)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=site.scale, enable_gqa=native_gqa)
        return site.shape_output(out, dtype)
    return fn


def _repeat_heads(x: torch.Tensor, groups: int, form: str | None) -> torch.Tensor:
    """x's heads repeated `groups` times each, written the way the model wrote it."""
    if form == "repeat_interleave":
        return x.repeat_interleave(groups, dim=1)
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)

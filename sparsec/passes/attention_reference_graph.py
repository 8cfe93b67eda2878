"""The stated reference of `block-sparse-attention`: each rewritten site computed as dense
`scaled_dot_product_attention` under the layout's element mask.

This path shares nothing with the op's attention: the static layout arrives as a dense element
mask (`BlockLayout.to_element_mask`), a dynamic layout as the dense block mask the rewritten
program selected (recorded by the pass's `reference`; or, without one, selected here by the
layout's `reference_keep` in plain torch) expanded to elements, and the attention itself is
torch's own SDPA (plain softmax attention for soft-capped sites, which SDPA cannot express).
Query rows with no visible key give 0, as the op defines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from .attention_match import SiteCall

if TYPE_CHECKING:
    from .attention import BlockSparseAttention

__all__ = ["reference_replacement", "blocks_to_elements", "dense_masked_attention",
           "MASKED_FLOOR"]


def blocks_to_elements(keep: torch.Tensor, q_len: int, kv_len: int, block_q: int,
                       block_kv: int, causal: bool) -> torch.Tensor:
    """bool [B, H, NQ, NKV] block mask → bool [B, H, q_len, kv_len] element mask."""
    rows = torch.arange(q_len, device=keep.device) // block_q
    cols = torch.arange(kv_len, device=keep.device) // block_kv
    mask = keep.index_select(-2, rows).index_select(-1, cols)
    if causal:
        mask = mask & torch.ones(q_len, kv_len, dtype=torch.bool, device=keep.device).tril()
    return mask


MASKED_FLOOR = -1e30
"""A float mask's most negative value as the reference passes it to SDPA. Models mask with
`finfo(dtype).min`, a finite number: a row whose visible keys all carry it averages them
evenly (in eager attention, the op and the float64 oracle alike), but CUDA's fused SDPA kernels
overflow it to -inf when they scale scores to base 2 and return 0 for that row. -1e30 is still
below every real score by far, so no other row changes."""


def dense_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           allowed: torch.Tensor, mask: torch.Tensor | None,
                           scale: float, softcap: float = 0.0) -> torch.Tensor:
    """SDPA of q [B, Hq, L, D] over k, v [B, Hkv, S, D] where `allowed` (and `mask`) permit;
    rows that see nothing give 0. `softcap` caps the scaled scores before the mask."""
    heads = q.shape[1]
    kk = k.repeat_interleave(heads // k.shape[1], dim=1)
    vv = v.repeat_interleave(heads // v.shape[1], dim=1)
    bias = None
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:  # a finite "masked" value stays finite (see MASKED_FLOOR)
            bias = mask.clamp_min(MASKED_FLOOR)
    row_any = allowed.any(-1, keepdim=True)
    safe = allowed | ~row_any  # SDPA would return NaN for a row with no key
    attn = safe if bias is None else bias.masked_fill(~safe, float("-inf"))
    if softcap:
        scores = torch.tanh((q @ kk.transpose(-1, -2)) * (scale / softcap)) * softcap
        scores = scores + attn if attn.dtype != torch.bool else \
            scores.masked_fill(~attn, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ vv
    else:
        out = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=attn,
                                                               scale=scale)
    return out.masked_fill(~row_any, 0.0).nan_to_num(0.0)


def reference_replacement(o: "BlockSparseAttention", call: SiteCall, recorded: bool = False
                          ) -> Callable[..., torch.Tensor]:
    """A torch function of `call.inputs()` computing the reference (a static layout arrives
    as one dense element-mask input; with `recorded`, a dynamic one as the dense block mask
    the rewritten site selected)."""
    site, spec, opts = call.site, o.spec, o.options()
    dtype = site.node.meta["val"].dtype
    L, S, block = site.q_len, site.kv_len, o.block

    def fn(*tensors):
        q, k, v, lay, mask = call.unpack(*tensors)
        if spec.static:
            allowed = lay[0]
        else:  # the blocks the rewritten site selected, or chosen here in plain torch
            keep = lay[0] if recorded else spec.reference_keep(opts, site, q, k, lay)
            allowed = blocks_to_elements(keep, L, S, block, block, site.causal)
        out = dense_masked_attention(q, k, v, allowed, mask, site.scale, site.softcap)
        return site.shape_output(out, dtype)
    return fn

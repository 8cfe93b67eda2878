"""Plain-torch implementations of block-sparse attention (the numerics oracle and CPU path).

Semantics shared by all of them (and by the kernels that replace them): query t attends key s
iff the layout keeps block (t // block_q, s // block_kv), s < kv_len, (causal ⇒ s ≤ t), and the
optional `attn_mask` allows it. `attn_mask` follows `scaled_dot_product_attention`: a bool
tensor (True = may attend) or a float tensor added to the scaled scores, broadcastable to
[B, Hq, L, S]; a float entry of −inf masks like False. `softcap` > 0 caps the scaled scores
before the mask is added, as Gemma 2 does: s → softcap · tanh(s / softcap) (0 = no cap). A
query row with no visible key outputs 0 and has logsumexp −inf (dense softmax would give NaN).
Computation is in float32 (float64 for float64 inputs); outputs are cast back to q's dtype.

- `block_sparse_attention_ref`: the dense scores under the layout's element mask: O(L·S).
- `block_sparse_attention_gathered`: gathers the kept key/value blocks of each query block and
  runs batched matmul → softmax → matmul on them: O(L · kept keys). It is the CPU path of the
  op and the form the ONNX export writes in standard ops.
- `block_sparse_attention_backward_ref`: dq, dk, dv from the explicit formulas, recomputing
  the probabilities from the saved logsumexp as flash-attention kernels do;
  `block_sparse_attention_bias_backward_ref` also the gradient of a float `attn_mask` (dS,
  zero outside the kept pairs, summed over the mask's broadcast dims).
"""

from __future__ import annotations

import math

import torch

__all__ = ["layout_element_mask", "block_sparse_attention_ref",
           "block_sparse_attention_gathered", "block_sparse_attention_backward_ref",
           "block_sparse_attention_bias_backward_ref", "block_sparse_attention_backward_ds",
           "fold_bias_grad", "soft_cap",
           "work_dtype"]


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def soft_cap(scores: torch.Tensor, softcap: float) -> torch.Tensor:
    """softcap · tanh(scores / softcap), or the scores unchanged for softcap 0."""
    if not softcap:
        return scores
    return torch.tanh(scores / softcap) * softcap


def fold_bias_grad(ds: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    """dS [B, Hq, L, S] summed over the dims the float mask broadcasts, in its dtype."""
    return ds.sum_to_size(attn_mask.shape).to(attn_mask.dtype).contiguous()


def _dense_blocks(num: torch.Tensor, idx: torch.Tensor, fnum: torch.Tensor, fidx: torch.Tensor,
                  nkv: int) -> torch.Tensor:
    """bool [Bl, Hl, NQ, NKV] from the two lists (padding never read)."""
    out = torch.zeros(*num.shape, nkv + 1, dtype=torch.bool, device=num.device)
    for n, i in ((num, idx), (fnum, fidx)):
        live = torch.arange(i.shape[-1], device=i.device) < n[..., None].long()
        out.scatter_(-1, torch.where(live, i.long(), nkv), True)
    return out[..., :nkv]


def layout_element_mask(num: torch.Tensor, idx: torch.Tensor, fnum: torch.Tensor,
                        fidx: torch.Tensor, q_len: int, kv_len: int, block_q: int,
                        block_kv: int, causal: bool) -> torch.Tensor:
    """bool [Bl, Hl, q_len, kv_len]: the pairs the layout lets attend."""
    dense = _dense_blocks(num, idx, fnum, fidx, math.ceil(kv_len / block_kv))
    rows = torch.arange(q_len, device=num.device) // block_q
    cols = torch.arange(kv_len, device=num.device) // block_kv
    mask = dense[:, :, rows][:, :, :, cols]
    if causal:
        t = torch.arange(q_len, device=num.device)
        mask = mask & (torch.arange(kv_len, device=num.device)[None, :] <= t[:, None])
    return mask


def _softmax_av(scores: torch.Tensor, allowed: torch.Tensor, v: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax over allowed entries, then @ v; empty rows give 0 and lse −inf."""
    s = scores.masked_fill(~allowed, float("-inf"))
    m = s.amax(-1, keepdim=True)
    empty = m == float("-inf")
    m = torch.where(empty, torch.zeros_like(m), m)
    p = torch.exp(s - m)
    total = p.sum(-1, keepdim=True)
    out = (p @ v) / torch.where(total > 0, total, torch.ones_like(total))
    lse = torch.where(total > 0, m + torch.log(total), torch.full_like(m, float("-inf")))
    return out, lse.squeeze(-1)


def _expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def _dense_scores(q, k, attn_mask, layout, scale, causal, block_q, block_kv, softcap=0.0):
    """(scores, allowed, d capped / d scaled or None) on the dense [B, Hq, L, S] grid, in the
    working dtype."""
    work = work_dtype(q.dtype)
    L, S = q.shape[-2], k.shape[-2]
    kk = _expand_heads(k, q.shape[1]).to(work)
    scores = (q.to(work) @ kk.transpose(-1, -2)) * scale
    cap_grad = None
    if softcap:
        t = torch.tanh(scores / softcap)
        scores, cap_grad = t * softcap, 1 - t * t
    allowed = layout_element_mask(*layout, L, S, block_q, block_kv, causal)
    allowed = allowed.expand(q.shape[0], q.shape[1], L, S)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            scores = scores + attn_mask.to(work)
    return scores, allowed, cap_grad


def block_sparse_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
                               full_kv_num_blocks: torch.Tensor, full_kv_indices: torch.Tensor,
                               attn_mask: torch.Tensor | None, scale: float, causal: bool,
                               block_q: int, block_kv: int, softcap: float = 0.0
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, L, Dv], lse [B, Hq, L]): dense attention under the layout's mask."""
    layout = (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)
    scores, allowed, _ = _dense_scores(q, k, attn_mask, layout, scale, causal, block_q,
                                       block_kv, softcap)
    vv = _expand_heads(v, q.shape[1]).to(scores.dtype)
    out, lse = _softmax_av(scores, allowed, vv)
    return out.to(q.dtype).contiguous(), lse.contiguous()


def block_sparse_attention_backward_ref(grad_out: torch.Tensor, q: torch.Tensor,
                                        k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                                        lse: torch.Tensor, kv_num_blocks: torch.Tensor,
                                        kv_indices: torch.Tensor,
                                        full_kv_num_blocks: torch.Tensor,
                                        full_kv_indices: torch.Tensor,
                                        attn_mask: torch.Tensor | None, scale: float,
                                        causal: bool, block_q: int, block_kv: int,
                                        softcap: float = 0.0
                                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv): dk and dv summed over each key/value head's query-head group."""
    return block_sparse_attention_backward_ds(
        grad_out, q, k, v, out, lse, kv_num_blocks, kv_indices, full_kv_num_blocks,
        full_kv_indices, attn_mask, scale, causal, block_q, block_kv, softcap)[:3]


def block_sparse_attention_bias_backward_ref(grad_out, q, k, v, out, lse, kv_num_blocks,
                                             kv_indices, full_kv_num_blocks, full_kv_indices,
                                             attn_mask, scale, causal, block_q, block_kv,
                                             softcap=0.0):
    """(dq, dk, dv, d attn_mask) for a float `attn_mask` (an additive bias)."""
    if attn_mask is None or attn_mask.dtype == torch.bool:
        raise ValueError("a bias gradient needs a float attn_mask")
    *grads, ds = block_sparse_attention_backward_ds(
        grad_out, q, k, v, out, lse, kv_num_blocks, kv_indices, full_kv_num_blocks,
        full_kv_indices, attn_mask, scale, causal, block_q, block_kv, softcap)
    return (*grads, fold_bias_grad(ds, attn_mask))


def block_sparse_attention_backward_ds(grad_out, q, k, v, out, lse, kv_num_blocks, kv_indices,
                                       full_kv_num_blocks, full_kv_indices, attn_mask, scale,
                                       causal, block_q, block_kv, softcap=0.0):
    """(dq, dk, dv, dS [B, Hq, L, S] in the working dtype: the gradient of the capped,
    biased scores, 0 where nothing is attended)."""
    layout = (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)
    scores, allowed, cap_grad = _dense_scores(q, k, attn_mask, layout, scale, causal, block_q,
                                              block_kv, softcap)
    work = scores.dtype
    lse_w = lse.to(work)[..., None]
    live = torch.isfinite(lse_w)
    p = torch.exp(scores.masked_fill(~allowed, float("-inf")) -
                  torch.where(live, lse_w, torch.zeros_like(lse_w)))
    p = torch.where(live & allowed, p, torch.zeros_like(p))
    heads, kv_heads = q.shape[1], k.shape[1]
    do, o = grad_out.to(work), out.to(work)
    vv = _expand_heads(v, heads).to(work)
    kk = _expand_heads(k, heads).to(work)
    dv = p.transpose(-1, -2) @ do
    ds = p * ((do @ vv.transpose(-1, -2)) - (do * o).sum(-1, keepdim=True))
    ds_pre = ds if cap_grad is None else ds * cap_grad   # through softcap · tanh(s / softcap)
    dq = (ds_pre @ kk) * scale
    dk = (ds_pre.transpose(-1, -2) @ q.to(work)) * scale
    return (dq.to(q.dtype).contiguous(), _fold(dk, kv_heads).to(k.dtype).contiguous(),
            _fold(dv, kv_heads).to(v.dtype).contiguous(), ds)


def _fold(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Sum query heads back onto their key/value head: [B, Hq, ...] → [B, Hkv, ...]."""
    b, h = x.shape[:2]
    return x.view(b, kv_heads, h // kv_heads, *x.shape[2:]).sum(2)


# gathered blocks ------------------------------------------------------------------------
def block_sparse_attention_gathered(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
                                    full_kv_num_blocks: torch.Tensor,
                                    full_kv_indices: torch.Tensor,
                                    attn_mask: torch.Tensor | None, scale: float,
                                    causal: bool, block_q: int, block_kv: int,
                                    softcap: float = 0.0
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) computing only the kept blocks; same semantics as the reference."""
    b, h, L, _ = q.shape
    S, dv = k.shape[-2], v.shape[-1]
    work = work_dtype(q.dtype)
    nq = math.ceil(L / block_q)
    ids = torch.cat([kv_indices, full_kv_indices], -1).long().expand(b, h, nq, -1)
    width = ids.shape[-1]
    if width == 0:
        return (q.new_zeros(b, h, L, dv),
                torch.full((b, h, L), float("-inf"), dtype=work, device=q.device))
    live = torch.cat([_slots(kv_num_blocks, kv_indices), _slots(full_kv_num_blocks,
                                                                full_kv_indices)], -1)
    live = live.expand(b, h, nq, -1)
    offs = torch.arange(block_kv, device=q.device)
    pos = (ids[..., None] * block_kv + offs).flatten(-2)          # [B, H, NQ, W·bk]
    allowed = (live.repeat_interleave(block_kv, -1) & (pos < S))[:, :, :, None, :]
    pos = pos.clamp(max=S - 1)
    kg = _gather_rows(k, pos, h).to(work)                          # [B, H, NQ, W·bk, D]
    vg = _gather_rows(v, pos, h).to(work)
    qb = _pad_rows(q.to(work), nq * block_q).unflatten(2, (nq, block_q))
    scores = soft_cap((qb @ kg.transpose(-1, -2)) * scale, softcap)  # [B, H, NQ, bq, W·bk]
    t = (torch.arange(nq, device=q.device)[:, None] * block_q +
         torch.arange(block_q, device=q.device))                   # [NQ, bq]
    if causal:
        allowed = allowed & (pos[:, :, :, None, :] <= t[None, None, :, :, None])
    if attn_mask is not None:
        m = _gather_mask(attn_mask, pos, t.clamp(max=L - 1), b, h)
        if m.dtype == torch.bool:
            allowed = allowed & m
        else:
            scores = scores + m.to(work)
    out, lse = _softmax_av(scores, allowed, vg)
    out = out.flatten(2, 3)[:, :, :L].to(q.dtype).contiguous()
    return out, lse.flatten(2, 3)[:, :, :L].contiguous()


def _slots(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.arange(idx.shape[-1], device=idx.device) < num[..., None].long()


def _gather_rows(x: torch.Tensor, pos: torch.Tensor, heads: int) -> torch.Tensor:
    """x [B, Hkv, S, D] at key positions pos [B, H, NQ, P] → [B, H, NQ, P, D]."""
    from ..layouts.dynamic import kv_head_index

    b, _, nq, p = pos.shape
    xh = x[:, kv_head_index(heads, x.shape[1], x.device)]           # [B, H, S, D]
    flat = pos.reshape(b, heads, nq * p, 1).expand(-1, -1, -1, x.shape[-1])
    return torch.gather(xh, 2, flat).view(b, heads, nq, p, x.shape[-1])


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    pad = rows - x.shape[-2]
    return torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x


def _gather_mask(mask: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor, b: int,
                 h: int) -> torch.Tensor:
    """mask (broadcastable to [B, H, L, S]) at (row t, key pos) → [B, H, NQ, bq, P], without
    materializing the broadcast mask."""
    while mask.dim() < 4:
        mask = mask[None]
    dev = mask.device

    def index(dim: int, n: int, shape: tuple[int, ...]) -> torch.Tensor:
        if mask.shape[dim] == 1:
            return torch.zeros(shape, dtype=torch.long, device=dev)
        return torch.arange(n, device=dev).view(shape)

    bi = index(0, b, (b, 1, 1, 1, 1))
    hi = index(1, h, (1, h, 1, 1, 1))
    ti = rows[None, None, :, :, None] if mask.shape[2] != 1 else \
        torch.zeros((1, 1, 1, 1, 1), dtype=torch.long, device=dev)
    si = pos[:, :, :, None, :] if mask.shape[3] != 1 else \
        torch.zeros((1, 1, 1, 1, 1), dtype=torch.long, device=dev)
    return mask[bi, hi, ti, si]

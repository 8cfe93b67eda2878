"""Learned layouts: a small gate per attention site, trained by distillation (SeerAttention-
style).

The gate mean-pools q and k per block, maps them through small per-head linear maps
(`wq` [Hq, D, G], `wk` [Hkv, D, G]), and scores key blocks with a softmax over
(pool(q)·wq)·(pool(k)·wk)ᵀ·scale; `sparsec::select_blocks` then keeps the `topk` best
of them besides the sink and local blocks (the `threshold` option is not used here). The maps start as the identity
(G = D), so an untrained gate is the pooled-QK top-k selector; training moves the gate towards
the dense model's attention mass per block:

    target[b, h, i, j] = mean over queries t of block i of Σ_{s in block j} softmax(q_t·kᵀ)_s

(the dense attention of that layer, with its mask, on the same q and k), with the loss
KL(target ‖ gate). Only the gate parameters train; every base weight stays frozen and the
sites run dense attention while training, so each gate learns the dense model's attention.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Iterable

import torch
from torch import fx
from torch.utils import _pytree as pytree

from ..errors import BadInputError
from ..program import Program, node_info
from .block_layout import block_geometry
from .dynamic import kv_head_index, pool_blocks

__all__ = ["init_gate", "gate_logits", "attention_block_target", "kl_to_target",
           "gate_distillation_loss", "train_gates", "gate_parameters", "load_gates",
           "save_gates"]


def init_gate(heads: int, kv_heads: int, head_dim: int, gate_dim: int = 0,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(wq [Hq, D, G], wk [Hkv, D, G]): the identity for G = D, else a fixed random
    orthonormal projection scaled so dot products are kept on average."""
    g = gate_dim or head_dim
    if g == head_dim:
        eye = torch.eye(head_dim)
        return eye.expand(heads, -1, -1).clone(), eye.expand(kv_heads, -1, -1).clone()
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=gen))
    proj = basis[:, :g] * math.sqrt(head_dim / g)
    return proj.expand(heads, -1, -1).clone(), proj.expand(kv_heads, -1, -1).clone()


def gate_logits(q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor,
                scale: float, causal: bool, block_q: int, block_kv: int) -> torch.Tensor:
    """float32 [B, Hq, NQ, NKV] block logits; blocks with no visible element are −inf."""
    qp = pool_blocks(q.detach(), block_q)
    kp = pool_blocks(k.detach(), block_kv)
    qg = torch.einsum("bhnd,hde->bhne", qp, wq.to(qp.dtype))
    kg = torch.einsum("bhnd,hde->bhne", kp, wk.to(kp.dtype))
    kg = kg[:, kv_head_index(q.shape[1], k.shape[1], q.device)]
    logits = (qg @ kg.transpose(-1, -2)) * scale
    valid, _ = block_geometry(q.shape[-2], k.shape[-2], block_q, block_kv, causal, q.device)
    return logits.float().masked_fill(~valid, float("-inf"))


@torch.no_grad()
def attention_block_target(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None,
                           scale: float, causal: bool, block_q: int,
                           block_kv: int) -> torch.Tensor:
    """float32 [B, Hq, NQ, NKV]: the dense attention's mass per block (rows sum to 1, or 0
    for query blocks that see nothing)."""
    L, S = q.shape[-2], k.shape[-2]
    kk = k[:, kv_head_index(q.shape[1], k.shape[1], q.device)].float()
    s = (q.float() @ kk.transpose(-1, -2)) * scale
    allowed = torch.ones(L, S, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            s = s + attn_mask.float()
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    nkv = math.ceil(S / block_kv)
    p = torch.nn.functional.pad(p, (0, nkv * block_kv - S)).unflatten(-1, (nkv, block_kv)).sum(-1)
    return pool_blocks(p, block_q).float()


def kl_to_target(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over (batch, head, query block) of KL(target ‖ softmax(logits))."""
    logp = torch.log_softmax(logits, dim=-1)
    safe_logp = torch.where(target > 0, logp, torch.zeros_like(logp))
    safe_t = torch.where(target > 0, target, torch.ones_like(target))
    kl = torch.where(target > 0, target * (torch.log(safe_t) - safe_logp),
                     torch.zeros_like(target))
    return kl.sum(-1).mean()


# programs -----------------------------------------------------------------------------------
def _learned_sites(program: Program) -> list[fx.Node]:
    return [n for n in program.gm.graph.nodes
            if node_info(n).get("attention", {}).get("layout") == "learned"
            and n.target is torch.ops.sparsec.block_sparse_attention.default]


def gate_parameters(program: Program) -> dict[str, torch.nn.Parameter]:
    """The gate parameters of a program's learned sites, by qualified name."""
    names = []
    for n in _learned_sites(program):
        names += node_info(n)["attention"]["gate_params"]
    return {name: program.gm.get_parameter(name) for name in names}


class _DenseCapture(fx.Interpreter):
    """Runs the program with learned sites computed densely; keeps what distillation needs."""

    def __init__(self, gm: fx.GraphModule, sites: list[fx.Node]):
        super().__init__(gm)
        self.sites = set(sites)
        self.logit_nodes = {node_info(n)["attention"]["gate_logits"]: n for n in sites}
        self.captured: dict[fx.Node, dict[str, Any]] = {n: {} for n in sites}

    def run_node(self, n: fx.Node) -> Any:
        if n in self.sites:
            args, _ = self.fetch_args_kwargs_from_env(n)
            q, k, v, *_, mask, scale, causal, bq, bk = args
            self.captured[n].update(q=q, k=k, mask=mask, scale=scale, causal=causal, bq=bq,
                                    bk=bk)
            return _dense_attention(q, k, v, mask, scale, causal)
        value = super().run_node(n)
        site = self.logit_nodes.get(n.name)
        if site is not None:
            self.captured[site]["logits"] = value
        return value


def _dense_attention(q, k, v, mask, scale, causal):
    heads = q.shape[1]
    kk = k.repeat_interleave(heads // k.shape[1], 1)
    vv = v.repeat_interleave(heads // v.shape[1], 1)
    with torch.no_grad():
        out = torch.nn.functional.scaled_dot_product_attention(
            q, kk, vv, attn_mask=mask, is_causal=causal and mask is None, scale=scale)
        if causal and mask is not None:
            tri = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
            m = mask & tri if mask.dtype == torch.bool else \
                mask.masked_fill(~tri, float("-inf"))
            out = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=m,
                                                                   scale=scale)
    return out.nan_to_num(0.0), torch.zeros(q.shape[:3], device=q.device)


def gate_distillation_loss(program: Program, inputs: tuple) -> torch.Tensor:
    """The distillation loss of every learned site on `inputs` (the model inputs): a scalar
    with gradients to the gate parameters only. This is the hook for `sparsec train`."""
    sites = _learned_sites(program)
    if not sites:
        raise BadInputError("the program has no learned attention gates; run "
                            "block-sparse-attention with layout = \"learned\" first")
    cap = _DenseCapture(program.gm, sites)
    cap.run(*pytree.tree_leaves(tuple(inputs)))
    losses = []
    for site in sites:
        c = cap.captured[site]
        target = attention_block_target(c["q"], c["k"], c["mask"], c["scale"], c["causal"],
                                         c["bq"], c["bk"])
        losses.append(kl_to_target(c["logits"], target))
    return torch.stack(losses).mean()


def train_gates(program: Program, batches: Iterable[tuple] | None = None, steps: int = 100,
                lr: float = 5e-3, log: Any = None) -> list[float]:
    """Train the learned gates of `program` in place by distillation; base weights stay
    frozen. `batches` yields tuples whose first items are the model inputs (default: the
    model file's batches(), else the example inputs). Returns the loss per step."""
    if steps < 1 or lr <= 0:
        raise BadInputError(f"train_gates needs steps ≥ 1 and lr > 0 (got {steps}, {lr})")
    gates = gate_parameters(program)
    if not gates:
        raise BadInputError("the program has no learned attention gates; run "
                            "block-sparse-attention with layout = \"learned\" first")
    n_inputs = len(program.example_inputs)
    if batches is None:
        batches = program.source.batches() if program.source.batches else \
            itertools.repeat(program.example_inputs)
    flags = {name: p.requires_grad for name, p in program.gm.named_parameters()}
    for name, p in program.gm.named_parameters():
        p.requires_grad_(name in gates)
    opt = torch.optim.Adam(gates.values(), lr=lr)
    losses: list[float] = []
    try:
        for step, batch in zip(range(steps), batches):
            loss = gate_distillation_loss(program, tuple(batch)[:n_inputs])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if log is not None:
                log(step, losses[-1])
    finally:
        for name, p in program.gm.named_parameters():
            p.requires_grad_(flags[name])
    return losses


def save_gates(program: Program, path: str) -> None:
    """Write the gate parameters to a safetensors file (atomically)."""
    from safetensors.torch import save

    from .._util import atomic_write_bytes

    tensors = {k: v.detach().contiguous().cpu() for k, v in gate_parameters(program).items()}
    atomic_write_bytes(path, save(tensors))


def load_gates(path: str) -> dict[str, torch.Tensor]:
    """Gate tensors from a safetensors file (never a pickle)."""
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such gates file; train one with "
                            "`sparsec train-gates`") from None
    except Exception as e:
        raise BadInputError(f"{path}: not a safetensors gates file ({e})") from None

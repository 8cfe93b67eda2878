"""Small random models built from a printable spec, for property-based pass testing.

A `RandomModel` is a stack of layers described by `LayerSpec`s over a (batch, length, dim)
input. `snippet()` prints Python that rebuilds the exact model, so a shrunk hypothesis failure
can be pasted into a test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerSpec", "ModelSpec", "RandomModel", "build_model", "inputs_for", "ATTENTION_FORMS",
           "NOT_ATTENTION_FORMS"]

# Attention forms: which op sequence the model writes. "sdpa*" use
# F.scaled_dot_product_attention; "manual*" write matmul → scale → mask → softmax → matmul.
ATTENTION_FORMS = ("sdpa", "sdpa_causal", "sdpa_mask", "manual", "manual_causal", "manual_div")
# Look-alikes the attention pass must leave alone: softmax over the query axis, and a
# softmax whose scores go through a nonlinearity first (a sigmoid: a tanh between constant
# scales is a soft-cap, which the op takes).
NOT_ATTENTION_FORMS = ("softmax_over_queries", "sigmoid_scores")


@dataclass(frozen=True)
class LayerSpec:
    """One layer. kind: linear | norm | act | mlp | attention; `args` as a sorted tuple."""

    kind: str
    args: tuple[tuple[str, Any], ...] = ()

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.args).get(key, default)


@dataclass(frozen=True)
class ModelSpec:
    dim: int
    layers: tuple[LayerSpec, ...]
    batch: int = 2
    length: int = 8
    dtype: str = "float32"
    seed: int = 0
    vocab: int = 0  # > 0: inputs are token ids through an embedding
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


class _Norm(nn.Module):
    def __init__(self, dim: int, kind: str):
        super().__init__()
        self.kind = kind
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "layer" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layer":
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


_ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


class _Act(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ACTS[self.name](x)


class _MLP(nn.Module):
    """A residual SwiGLU or GELU MLP block."""

    def __init__(self, dim: int, hidden: int, gated: bool, bias: bool):
        super().__init__()
        self.gated = gated
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.gate_proj = nn.Linear(dim, hidden, bias=bias) if gated else None
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up_proj(x)
        h = F.silu(self.gate_proj(x)) * h if self.gated else F.gelu(h)
        return x + self.down_proj(h)


class _Attention(nn.Module):
    """A residual attention block in one of `ATTENTION_FORMS`, with optional GQA."""

    def __init__(self, dim: int, heads: int, kv_heads: int, form: str, gqa: str, bias: bool):
        super().__init__()
        self.heads, self.kv_heads, self.form, self.gqa = heads, kv_heads, form, gqa
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=bias)

    def _repeat(self, t: torch.Tensor) -> torch.Tensor:
        groups = self.heads // self.kv_heads
        if groups == 1:
            return t
        if self.gqa == "repeat_interleave":
            return t.repeat_interleave(groups, dim=1)
        b, h, n, d = t.shape
        return t[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        k, v = self._repeat(k), self._repeat(v)
        out = self._attend(q, k, v, n)
        return x + self.o_proj(out.transpose(1, 2).reshape(b, n, -1))

    def _attend(self, q, k, v, n: int) -> torch.Tensor:
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        if self.form == "softmax_over_queries":
            return (q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)).softmax(dim=-2) @ v
        if self.form == "sigmoid_scores":
            return torch.sigmoid(q @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        if self.form == "sdpa":
            return F.scaled_dot_product_attention(q, k, v)
        if self.form == "sdpa_causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self.form == "sdpa_mask":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=causal)
        scores = q @ k.transpose(-2, -1)
        if self.form == "manual_div":
            scores = scores / math.sqrt(self.head_dim)
        else:
            scores = scores * (1.0 / math.sqrt(self.head_dim))
        if self.form in ("manual_causal", "manual_div"):
            scores = scores.masked_fill(~causal, float("-inf"))
        return scores.softmax(dim=-1) @ v


class _Conv1x1(nn.Module):
    """A pointwise convolution over the length axis (what conv-mixer and some ViTs use)."""

    def __init__(self, dim: int, bias: bool):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


class RandomModel(nn.Module):
    """A model built from a `ModelSpec`; see the module docstring."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab, spec.dim) if spec.vocab else None
        blocks = [_build_layer(spec.dim, layer) for layer in spec.layers]
        self.blocks = nn.ModuleList(blocks)
        g = torch.Generator().manual_seed(spec.seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                noise = torch.randn(p.shape, generator=g)
                if p.dim() > 1:  # keep activations O(1) through the stack
                    p.copy_(noise / math.sqrt(p.shape[1]))
                else:  # norm weights near 1, biases near 0
                    p.copy_(noise * 0.1 + (1.0 if name.endswith("weight") else 0.0))
        self.to(getattr(torch, spec.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return x

    def snippet(self) -> str:
        """Python that rebuilds this model and its inputs."""
        layers = ",\n        ".join(f"LayerSpec({x.kind!r}, {x.args!r})" for x in self.spec.layers)
        s = self.spec
        return (
            "from sparsec.testing.models import LayerSpec, ModelSpec, build_model, inputs_for\n"
            f"spec = ModelSpec(dim={s.dim}, batch={s.batch}, length={s.length}, "
            f"dtype={s.dtype!r}, seed={s.seed}, vocab={s.vocab}, layers=(\n"
            f"        {layers},\n    ))\n"
            "model = build_model(spec)\ninputs = inputs_for(model)\n")


def _build_layer(dim: int, layer: LayerSpec) -> nn.Module:
    a = dict(layer.args)
    if layer.kind == "linear":
        return nn.Linear(dim, dim, bias=a.get("bias", True))
    if layer.kind == "conv1x1":
        return _Conv1x1(dim, a.get("bias", True))
    if layer.kind == "norm":
        return _Norm(dim, a.get("type", "layer"))
    if layer.kind == "act":
        return _Act(a.get("fn", "relu"))
    if layer.kind == "mlp":
        return _MLP(dim, a.get("hidden", 2 * dim), a.get("gated", False), a.get("bias", True))
    if layer.kind == "attention":
        return _Attention(dim, a.get("heads", 2), a.get("kv_heads", a.get("heads", 2)),
                          a.get("form", "sdpa"), a.get("gqa", "expand"), a.get("bias", False))
    raise ValueError(f"unknown layer kind {layer.kind!r}")


def build_model(spec: ModelSpec) -> RandomModel:
    return RandomModel(spec).eval()


def inputs_for(model: RandomModel, seed: int = 0) -> tuple[torch.Tensor]:
    """Example inputs that fit `model`: (batch, length, dim) in its dtype, from `seed`."""
    s = model.spec
    g = torch.Generator().manual_seed(seed + 1000)
    if s.vocab:
        return (torch.randint(0, s.vocab, (s.batch, s.length), generator=g),)
    x = torch.randn(s.batch, s.length, s.dim, generator=g)
    return (x.to(getattr(torch, s.dtype)),)

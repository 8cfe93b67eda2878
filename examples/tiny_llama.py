"""A small Llama-style decoder in plain torch: sparsec's built-in example.

RMSNorm, rotary position embeddings, grouped-query attention through SDPA, a SwiGLU MLP and
tied input/output embeddings; random weights from a fixed seed. Byte-level tokens, so the
training batches below need no tokenizer. `Config` scales it up for benchmarks.

The hooks sparsec reads: model(), example_inputs(), loss(output, batch), batches().
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Config:
    vocab: int = 256
    dim: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 176
    max_len: int = 128
    rope_theta: float = 10000.0
    eps: float = 1e-5


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Attention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.heads, c.kv_heads, c.dim // c.heads
        self.q_proj = nn.Linear(c.dim, c.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c.dim, c.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c.dim, c.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(c.heads * self.head_dim, c.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k, v = repeat_kv(k, self.heads // self.kv_heads), repeat_kv(v, self.heads // self.kv_heads)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(b, kv_heads, n, d) → (b, kv_heads * groups, n, d), as Hugging Face Llama writes it."""
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


class MLP(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.dim, c.ffn, bias=False)
        self.up_proj = nn.Linear(c.dim, c.ffn, bias=False)
        self.down_proj = nn.Linear(c.ffn, c.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.attn_norm = RMSNorm(c.dim, c.eps)
        self.attn = Attention(c)
        self.mlp_norm = RMSNorm(c.dim, c.eps)
        self.mlp = MLP(c)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.config = c
        self.embed = nn.Embedding(c.vocab, c.dim)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = RMSNorm(c.dim, c.eps)
        head_dim = c.dim // c.heads
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.outer(torch.arange(c.max_len).float(), inv)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        x = self.embed(tokens)
        cos, sin = self.cos[:n].to(x.dtype), self.sin[:n].to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return F.linear(self.norm(x), self.embed.weight)  # tied output embedding


def init_weights(model: Llama, seed: int = 0) -> Llama:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            continue
        std = 0.02 if p.dim() > 1 else 0.0
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


# sparsec hooks --------------------------------------------------------------------------
BATCH, SEQ = 2, 32

CORPUS = (
    "Sparse fine-tuning trains a small set of chosen weights and leaves the rest as they were. "
    "Block-sparse attention keeps the key blocks that matter for each query block and skips "
    "the others. A compiler that sees the whole graph can prove each rewrite against the model "
    "it came from, and can drop every gradient that no trainable value needs. "
) * 8


def model() -> nn.Module:
    return init_weights(Llama(Config()))


def example_inputs() -> tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, Config.vocab, (BATCH, SEQ), generator=g),)


def loss(output: torch.Tensor, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Next-token cross-entropy."""
    tokens = batch[0]
    return F.cross_entropy(output[:, :-1].reshape(-1, output.shape[-1]), tokens[:, 1:].reshape(-1))


def batches(steps: int = 1000, seed: int = 0):
    """Random windows of CORPUS as byte tokens: a loss that can fall in a few dozen steps."""
    data = torch.tensor(list(CORPUS.encode()), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - SEQ, (BATCH,), generator=g)
        yield (torch.stack([data[s:s + SEQ] for s in starts]),)


def parameter_count(c: Config) -> int:
    """Parameters of a model of this config (tied embeddings counted once)."""
    attn = c.dim * (c.dim // c.heads) * (2 * c.heads + 2 * c.kv_heads)
    mlp = 3 * c.dim * c.ffn
    return c.vocab * c.dim + c.layers * (attn + mlp + 2 * c.dim) + c.dim


if __name__ == "__main__":
    with torch.no_grad():
        m = model()
        logits = m(*example_inputs())
        print(f"{parameter_count(m.config):,} parameters; logits {tuple(logits.shape)}; "
              f"loss {float(loss(logits, example_inputs())):.3f} (ln 256 = {math.log(256):.3f})")

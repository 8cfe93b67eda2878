"""Attention under a constant causal mask is traced into causal SDPA (issue 17, item 1): the
mask is gone, `is_causal=True`, and outputs equal the eager model's; any other mask stays."""

from __future__ import annotations

import math

import pytest
import torch

import sparsec
from sparsec.frontend import tracing_model
from sparsec.passes.attention import BlockSparseAttention
from sparsec.passes.canonicalize import causal_attention
from sparsec.testing import check_pass

T = pytest.importorskip("transformers")
SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _sdpa_calls(gm) -> list[tuple[bool, bool]]:
    """(is_causal, has a mask) of each SDPA node."""
    out = []
    for n in gm.graph.nodes:
        if n.target is SDPA:
            args = list(n.args) + [None] * 6
            mask = n.kwargs.get("attn_mask", args[3])
            out.append((bool(n.kwargs.get("is_causal", args[5])), mask is not None))
    return out


def _softmaxes(gm) -> int:
    return sum(1 for n in gm.graph.nodes if "softmax" in str(n.target))


class _Manual(torch.nn.Module):
    """Hand-written attention with the mask in a form models use."""

    def __init__(self, form: str, d: int = 32, heads: int = 4, kv_heads: int = 4):
        super().__init__()
        self.form, self.heads, self.kv_heads = form, heads, kv_heads
        hd = d // heads
        self.q = torch.nn.Linear(d, d)
        self.kv = torch.nn.Linear(d, 2 * kv_heads * hd)
        self.register_buffer("bias", torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64))

    def forward(self, x):
        b, t, c = x.shape
        hd = c // self.heads
        q = self.q(x).view(b, t, self.heads, hd).transpose(1, 2)
        k, v = (z.view(b, t, self.kv_heads, hd).transpose(1, 2)
                for z in self.kv(x).split(self.kv_heads * hd, 2))
        g = self.heads // self.kv_heads
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
        if self.form == "eq0":  # nanoGPT
            att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        elif self.form == "additive":
            att = att + torch.full((t, t), torch.finfo(att.dtype).min).triu(1)
        elif self.form == "window":  # causal and a window of 8: not the causal triangle
            i = torch.arange(t)
            keep = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 8)
            att = att.masked_fill(~keep, float("-inf"))
        return (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c)


@pytest.mark.parametrize("form,heads", [("eq0", 4), ("additive", 4), ("eq0", 2)])
def test_hand_written_causal_attention_becomes_causal_sdpa(form, heads):
    torch.manual_seed(0)
    model, x = _Manual(form, kv_heads=heads).eval(), torch.randn(2, 24, 32)
    program = sparsec.trace(model, (x,))
    assert _sdpa_calls(program.gm) == [(True, False)] and _softmaxes(program.gm) == 0
    torch.testing.assert_close(program.gm(x), model(x), rtol=1e-5, atol=1e-5)
    assert len(program.state["report"]["trace"]["causal"]) == 1


def test_a_window_mask_is_left_alone():
    program = sparsec.trace(_Manual("window").eval(), (torch.randn(2, 24, 32),))
    assert _sdpa_calls(program.gm) == [] and _softmaxes(program.gm) == 1
    assert "causal" not in program.state.get("report", {}).get("trace", {})


def _llama(**kw):
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=100, **kw)
    return T.LlamaForCausalLM(cfg).eval()


def _ids(batch: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hf_llama_with_library_defaults_runs_causal_sdpa(impl):
    model, ids = _llama(attn_implementation=impl), _ids(length=20)
    program = sparsec.trace(model, (ids,))
    assert _sdpa_calls(program.gm) == [(True, False)] * 2
    torch.testing.assert_close(program.gm(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    squares = [n.name for n in program.gm.graph.nodes if isinstance(n.meta.get("val"),
               torch.Tensor) and tuple(n.meta["val"].shape[-2:]) == (20, 20)]
    assert squares == []  # no [L, L] mask left computed (kept alive by a metadata check)


def test_a_padding_mask_keeps_its_mask():
    """attention_mask depends on the inputs' values: causal SDPA cannot stand in for it."""
    class WithMask(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = _llama()

        def forward(self, ids, mask):
            return self.m(input_ids=ids, attention_mask=mask).logits

    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    program = sparsec.trace(WithMask(), (_ids(), mask))
    assert _sdpa_calls(program.gm) == [(False, True)] * 2


def test_a_symbolic_batch_is_canonicalized_and_right_at_other_batches():
    model = _llama()
    batch = torch.export.Dim("batch", min=1, max=8)
    with tracing_model(model):
        ep = torch.export.export(model, (_ids(),), dynamic_shapes=({0: batch},), strict=False)
    gm = ep.module()
    assert len(causal_attention(gm)) == 2 and _sdpa_calls(gm) == [(True, False)] * 2
    ids = _ids(batch=3)
    torch.testing.assert_close(gm(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_the_block_sparse_pass_sees_a_causal_site():
    program = sparsec.trace(_llama(), (_ids(length=48),))
    r = check_pass(BlockSparseAttention(layout="sliding-window", block=16, window=16), program)
    sites = r.program.state["report"]["attention"]["sites"]
    assert [(s["causal"], s["mask"], s["gqa"]) for s in sites] == [(True, "none", "expand")] * 2


@pytest.mark.gpu
def test_on_cuda_the_step_runs_causal_flash_attention():
    """bf16 HF Llama on the GPU: the traced graph's SDPA dispatches to the flash kernel (the
    masked one was the efficient kernel over the whole square) and matches eager."""
    model = _llama().to("cuda", torch.bfloat16)
    ids = _ids(length=256).cuda()
    program = sparsec.trace(model, (ids,))
    assert _sdpa_calls(program.gm) == [(True, False)] * 2
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        got = program.gm(ids).logits
        torch.cuda.synchronize()
    names = " ".join(e.key.lower() for e in prof.key_averages())
    assert "flash" in names, names
    torch.testing.assert_close(got.float(), model(ids).logits.float(), rtol=2e-2, atol=2e-2)

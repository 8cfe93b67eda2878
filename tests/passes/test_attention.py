"""block-sparse-attention on the tiny example and on hand-written attention forms."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparsec
from sparsec.errors import OptionError
from sparsec.layouts.learned import gate_parameters, load_gates, save_gates, train_gates
from sparsec.passes.attention import BlockSparseAttention
from sparsec.recipe import parse_recipe
from sparsec.testing import check_pass
from sparsec.testing import strategies as sst
from sparsec.testing.models import LayerSpec, ModelSpec, build_model, inputs_for

ISSUE_RECIPE = """
[[pass]]
name = "block-sparse-attention"
layout = "sliding-window"
window = 256
sink = 64
block = 64
"""


def element_mask(L, S, block, window, sink, causal=True):
    """Token rule (0 ≤ t−s < window, or s < sink), rounded up to blocks, by brute force."""
    t = torch.arange(L)[:, None]
    s = torch.arange(S)[None, :]
    d = t - s
    rule = ((d >= 0) & (d < window) if causal else d.abs() < window) | (s < sink)
    nq, nk = math.ceil(L / block), math.ceil(S / block)
    padded = torch.zeros(nq * block, nk * block, dtype=torch.bool)
    padded[:L, :S] = rule
    blocks = padded.view(nq, block, nk, block).any(3).any(1)
    m = blocks[t // block, s // block]
    return m & (s <= t) if causal else m


@pytest.fixture(scope="module")
def tiny_long():
    """The tiny example at 96 tokens (6 blocks of 16), traced once."""
    tl = sparsec.load_model_file(sparsec.__path__[0] + "/../examples/tiny_llama.py").module
    model = tl.init_weights(tl.Llama(tl.Config(max_len=128)))
    tokens = torch.randint(0, 256, (2, 96), generator=torch.Generator().manual_seed(0))
    return tl, model, sparsec.trace(model, (tokens,))


def test_dense_layout_reproduces_tiny_llama(tiny_llama_program):
    r = check_pass(BlockSparseAttention(layout="dense", block=16), tiny_llama_program)
    assert r.stats["sites_rewritten"] == 2 == r.stats["sites_found"]
    assert r.max_rel_err < 1e-5
    assert r.program.history[-1].verify["reference"] == "program before the pass"
    ops = [n for n in r.program.gm.graph.nodes
           if n.target is torch.ops.sparsec.block_sparse_attention.default]
    assert len(ops) == 2 and all(n.args[9] is True for n in ops)  # causal found
    assert not [n for n in r.program.gm.graph.nodes
                if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert ops[0].args[1].meta["val"].shape[1] == 2  # k stays at its 2 kv heads (GQA folded)


def test_sliding_window_equals_dense_attention_with_element_mask(tiny_long, monkeypatch):
    tl, model, program = tiny_long
    p = BlockSparseAttention(layout="sliding-window", block=16, window=24, sink=8)
    r = check_pass(p, program)
    mask = element_mask(96, 96, 16, 24, 8)
    sdpa = F.scaled_dot_product_attention

    def masked_sdpa(q, k, v, is_causal=False, **kw):
        assert is_causal
        return sdpa(q, k, v, attn_mask=mask)
    monkeypatch.setattr(F, "scaled_dot_product_attention", masked_sdpa)
    with torch.no_grad():
        want = model(*program.example_inputs)
        got = r.program.gm(*program.example_inputs)
    monkeypatch.undo()
    with torch.no_grad():
        eager = model(*program.example_inputs)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5
    assert float((got - eager).abs().max()) > 1e-4  # sparsity changed the model
    rep = r.program.state["report"]["attention"]
    assert rep["density"]["of"] == "causal block grid"
    assert rep["density"]["value"] == pytest.approx(float(
        mask.view(6, 16, 6, 16).any(3).any(1).sum()) / 21)


@pytest.mark.parametrize("options", [
    dict(layout="strided", stride=32, window=16, sink=0),
    dict(layout="dilated", window=64, dilation=2, sink=16),
    dict(layout="bigbird", window=16, global_tokens=16, random_blocks=1),
    dict(layout="mixture", mixture=("sliding-window", "dense"), window=16, sink=0),
    dict(layout="topk", topk=1, window=16, sink=16),
    dict(layout="threshold", threshold=0.5, topk=0, window=16, sink=0),
    dict(layout="vertical-slash", vertical=8, slash=4, window=16, sink=0),
    dict(layout="learned", topk=1, window=16, sink=16),
], ids=lambda o: o["layout"])
def test_every_layout_verifies_against_its_reference(tiny_long, options):
    _, _, program = tiny_long
    r = check_pass(BlockSparseAttention(block=16, **options), program)
    rep = r.program.state["report"]["attention"]
    assert rep["sites_rewritten"] == 2
    assert r.program.history[-1].verify["reference"].startswith("dense attention under")
    assert 0 < rep["density"]["value"] < 1


@pytest.mark.parametrize("layout", ["sliding-window", "topk"])
def test_reference_shares_the_program_parameters(tiny_long, layout):
    """The reference graph is rewritten beside the program without copying its weights."""
    _, _, program = tiny_long
    p = BlockSparseAttention(block=16, layout=layout, window=16, sink=16)
    ref = p.reference(program)
    names = [n for n, _ in program.gm.named_parameters()]
    assert names and all(ref.get_parameter(n) is program.gm.get_parameter(n) for n in names)


def test_dynamic_reference_records_the_selection_in_one_run(tiny_long, monkeypatch):
    """The blocks a dynamic layout selected are read from one run of the rewritten program
    (not one for the density and one for the recording)."""
    import sparsec.passes.attention as attention

    _, _, program = tiny_long
    runs = []
    record = attention._selected_layouts
    monkeypatch.setattr(attention, "_selected_layouts",
                        lambda *a: runs.append(1) or record(*a))
    p = BlockSparseAttention(block=16, layout="topk", topk=1, window=16, sink=16)
    assert p.reference(program).reference_name.endswith("the blocks each site selected")
    assert len(runs) == 1


def test_gradients_flow_through_the_op(tiny_llama_program):
    before = tiny_llama_program.copy()
    after = sparsec.run_passes(before, [BlockSparseAttention(layout="dense", block=16)])
    (tokens,) = before.example_inputs
    grads = []
    for prog in (before, after):
        prog.gm.zero_grad()
        out = prog.gm(tokens)
        F.cross_entropy(out[:, :-1].reshape(-1, 256), tokens[:, 1:].reshape(-1)).backward()
        grads.append({n: p.grad.clone() for n, p in prog.gm.named_parameters()
                      if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 5
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6)


def test_joint_graph_traces_and_matches(tiny_long):
    """AOTAutograd over the rewritten program (q, k, v are strided views there): the backward
    op appears and the gradients equal the model's."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module

    _, model, program = tiny_long
    after = sparsec.run_passes(program, [BlockSparseAttention(layout="dense", block=16)],
                               verify=False)
    seen = []

    def compiler(gm, _):
        seen.extend(str(n.target) for n in gm.graph.nodes)
        return make_boxed_func(gm)
    joint = aot_module(after.gm, fw_compiler=compiler, bw_compiler=compiler)
    (tokens,) = program.example_inputs
    joint(tokens).pow(2).mean().backward()
    model.zero_grad()
    model(tokens).pow(2).mean().backward()
    assert "sparsec.block_sparse_attention_backward.default" in seen
    ours, theirs = dict(after.gm.named_parameters()), dict(model.named_parameters())
    assert ours.keys() == theirs.keys()
    for name, p in ours.items():
        assert p is not theirs[name]
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-7)


# hand-written forms --------------------------------------------------------------------
class Attn(nn.Module):
    """Hand-written attention in several styles; x [B, L, 16] → [B, L, 16]."""

    def __init__(self, style: str, heads: int = 2, length: int = 40):
        super().__init__()
        self.style, self.h, self.d = style, heads, 16 // heads
        self.qkv = nn.Linear(16, 48)
        self.register_buffer("tril", torch.ones(length, length, dtype=torch.bool).tril())
        self.bias = nn.Parameter(torch.zeros(length, length))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
        s = self.style
        if s == "bmm3d":  # heads folded into the batch, older encoder-decoder style
            q, k, v = (t.reshape(b * self.h, n, self.d) for t in (q, k, v))
            w = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(self.d)
            w = w.masked_fill(~self.tril[:n, :n], float("-inf"))
            out = torch.bmm(torch.softmax(w, dim=-1), v).view(b, self.h, n, self.d)
        elif s == "scaled_q":
            w = (q * self.d ** -0.5) @ k.transpose(-1, -2)
            w = w + torch.full((n, n), float("-inf")).triu(1)
            p = F.dropout(torch.softmax(w, dim=-1, dtype=torch.float32), 0.1,
                          self.training).to(q.dtype)
            out = p @ v
        elif s == "softcap":
            w = torch.tanh(q @ k.transpose(-1, -2) / 30.0) * 30.0
            out = torch.softmax(w, -1) @ v
        elif s == "bias_in_tanh":
            w = torch.tanh((q @ k.transpose(-1, -2) + self.bias) / 30.0) * 30.0
            out = torch.softmax(w, -1) @ v
        elif s == "probs":
            p = torch.softmax(q @ k.transpose(-1, -2) * 0.3, -1)
            return (p @ v).transpose(1, 2).reshape(b, n, -1), p
        elif s == "learned_bias":
            out = torch.softmax(q @ k.transpose(-1, -2) * 0.3 + self.bias, -1) @ v
        elif s == "train_dropout":
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
        return out.transpose(1, 2).reshape(b, n, -1)


def _x(n=40):
    return (torch.randn(2, n, 16, generator=torch.Generator().manual_seed(0)),)


@pytest.mark.parametrize("style", ["bmm3d", "scaled_q"])
def test_hand_written_forms_are_rewritten(style):
    model = Attn(style).eval()
    r = check_pass(BlockSparseAttention(layout="dense", block=16), model, _x())
    assert r.stats["sites_rewritten"] == 1 and r.max_rel_err < 1e-5
    site = r.program.state["report"]["attention"]["sites"][0]
    assert site["causal"] is True and site["mask"] == "none"
    assert site["scale"] == pytest.approx(1 / math.sqrt(8))
    check_pass(BlockSparseAttention(layout="sliding-window", block=16, window=16, sink=0),
               model, _x(), idempotent=False)


@pytest.mark.parametrize("style", ["softcap", "learned_bias"])
def test_score_modifications_are_rewritten(style):
    """A tanh soft-cap and a bias parameter (issue 16, class 6): rewritten, equal to eager,
    and the bias gets eager's gradient."""
    model = Attn(style).eval()
    torch.nn.init.normal_(model.bias)
    r = check_pass(BlockSparseAttention(layout="dense", block=16), model, _x())
    assert r.stats["sites_rewritten"] == 1 and r.max_rel_err < 1e-5
    site = r.program.state["report"]["attention"]["sites"][0]
    assert site["softcap"] == (30.0 if style == "softcap" else 0.0)
    if style == "learned_bias":
        r.program.gm(*_x()).square().sum().backward()
        model(*_x()).square().sum().backward()
        got = dict(r.program.gm.named_parameters())["bias"].grad
        torch.testing.assert_close(got, model.bias.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("style,reason", [
    ("bias_in_tanh", "before the tanh soft-cap"),
    ("probs", "are used by"),
    ("train_dropout", "dropout_p=0.1"),
])
def test_unsupported_patterns_are_skipped_with_a_reason(style, reason):
    model = Attn(style).eval()
    # dropout makes outputs random: trace and run without the numeric checks there
    random = style == "train_dropout"
    program = sparsec.trace(model, _x(), check=not random)
    after = sparsec.run_passes(program, [BlockSparseAttention(block=16)], verify=not random)
    rep = after.state["report"]["attention"]
    assert rep["sites_found"] == 1 and rep["sites_rewritten"] == 0
    assert not after.history[-1].modified and after.gm.code == program.gm.code
    assert reason in rep["skipped"][0]["reason"], rep["skipped"]


@st.composite
def attention_models(draw):
    dim = draw(st.sampled_from([16, 32]))
    attention = sst.layer_specs(dim, attention=True, look_alikes=False).filter(
        lambda spec: spec.kind == "attention")
    layers = [draw(attention)]
    layers += draw(st.lists(sst.layer_specs(dim, attention=False), max_size=2))
    spec = ModelSpec(dim=dim, layers=tuple(layers), batch=draw(st.integers(1, 2)),
                     length=draw(st.integers(16, 40)), seed=draw(st.integers(0, 99)))
    return build_model(spec)


@settings(max_examples=6)
@given(attention_models())
def test_random_attention_models(model):
    inputs = inputs_for(model)
    r = check_pass(BlockSparseAttention(layout="dense", block=16), model, inputs)
    assert r.stats["sites_rewritten"] == 1 and r.max_rel_err < 1e-5
    check_pass(BlockSparseAttention(layout="sliding-window", block=16, window=8, sink=0),
               model, inputs, idempotent=False)


def test_gqa_repeat_interleave_is_folded():
    spec = ModelSpec(dim=16, length=33, layers=(LayerSpec("attention", (
        ("form", "manual_causal"), ("gqa", "repeat_interleave"), ("heads", 4),
        ("kv_heads", 2))),))
    model = build_model(spec)
    r = check_pass(BlockSparseAttention(layout="dense", block=16), model, inputs_for(model))
    site = r.program.state["report"]["attention"]["sites"][0]
    assert (site["gqa"], site["kv_heads"], site["causal"]) == ("repeat_interleave", 2, True)


# options, recipe, report -----------------------------------------------------------------
def test_recipe_from_the_issue_parses():
    (p,) = parse_recipe(ISSUE_RECIPE)
    assert (p.layout, p.window, p.sink, p.block) == ("sliding-window", 256, 64, 64)


@pytest.mark.parametrize("options,match", [
    (dict(block=48), "choose one of 0, 16, 32, 64, 128"),
    (dict(layout="sparse"), "choose one of 'dense'"),
    (dict(layout="mixture"), "must list static layouts"),
    (dict(layout="threshold", threshold=0.0), "must be > 0"),
    (dict(window=-1), "out of range"),
])
def test_bad_options_raise_one_line(options, match):
    with pytest.raises(OptionError, match=match) as e:
        BlockSparseAttention(**options)
    assert "\n" not in str(e.value)


def test_block_longer_than_the_sequence_is_refused(tiny_llama_program):
    with pytest.raises(OptionError, match=r"length 32; choose block ≤ 32 \(16, 32\)") as e:
        sparsec.run_passes(tiny_llama_program, [BlockSparseAttention(block=64)])
    assert "\n" not in str(e.value)


def test_report_section_and_learned_gates(tiny_long, tmp_path):
    _, _, program = tiny_long
    p = BlockSparseAttention(layout="learned", block=16, topk=1, window=16, sink=16)
    compiled = sparsec.compile(program, passes=[p], out_dir=tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    att = report["attention"]
    assert att["sites_found"] == att["sites_rewritten"] == 2 and att["skipped"] == []
    assert att["density"]["how"] == "measured on the example inputs"
    prog = compiled.program
    gates = gate_parameters(prog)
    assert len(gates) == 4
    frozen = {n: t.clone() for n, t in prog.gm.named_parameters() if n not in gates}
    start = {n: t.clone() for n, t in gates.items()}
    losses = train_gates(prog, None, steps=8, lr=0.05)
    assert losses[-1] < losses[0]
    assert all(torch.equal(t, dict(prog.gm.named_parameters())[n]) for n, t in frozen.items())
    assert any(not torch.equal(start[n], gates[n]) for n in gates)
    save_gates(prog, str(tmp_path / "gates.safetensors"))
    assert set(load_gates(str(tmp_path / "gates.safetensors"))) == set(gates)
    reloaded = sparsec.run_passes(program, [BlockSparseAttention(
        layout="learned", block=16, topk=1, window=16, sink=16,
        gates=str(tmp_path / "gates.safetensors"))], verify=False)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.gm(*program.example_inputs),
                                   prog.gm(*program.example_inputs))


class _WindowedLayer(torch.nn.Module):
    """One causal attention layer of issue 16's flake report (8 heads, width 512)."""

    def __init__(self, d: int = 512, heads: int = 8):
        super().__init__()
        self.heads, self.qkv, self.o = heads, torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)

    def forward(self, x):
        b, length, d = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, length, d))


def test_sliding_window_verification_is_the_same_every_time():
    """A compile is right or wrong every time: the same program compiled three times verifies
    with the same error, far inside the float32 tolerance (reported flaky once: 2 of 8 runs at
    2.3e-5 > 1e-5; not reproduced since in 14 processes and 5 seeds)."""
    torch.manual_seed(0)
    program = sparsec.trace(_WindowedLayer().eval(), (torch.randn(1, 1024, 512),))
    spec = "block-sparse-attention:layout=sliding-window,window=256,sink=64,block=64"
    errors = {sparsec.compile(program.copy(), passes=[spec]).program.history[-1]
              .verify["max_rel_err"] for _ in range(3)}
    assert len(errors) == 1 and errors.pop() < 1e-6

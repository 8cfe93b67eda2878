"""ONNX forms of block-sparse attention with score modifications (a tanh soft-cap, an additive
float bias), run in onnxruntime against the reference; the contrib op refuses soft-caps."""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch

import sparsec
from sparsec.layouts import per_head, sliding_window
from sparsec.ops.attention_reference import block_sparse_attention_ref
from sparsec.ops.onnx_attention import Geometry, contrib_refusal
from sparsec.ops.onnx_common import ExportContext, export_context, ir

bsa = torch.ops.sparsec.block_sparse_attention
f64 = torch.float64

# (layout, batch, q heads, kv heads, head dim, bias, softcap, dtype)
CASES = [
    (sliding_window(50, block=16, window=16, sink=8), 2, 4, 2, 8, False, 2.0, f64),
    (per_head([sliding_window(48, block=16, window=16), sliding_window(48, block=16)] * 2),
     1, 4, 1, 8, True, 3.0, f64),
    (sliding_window(40, block=16, window=32, sink=0, causal=False), 2, 2, 2, 8, True, 0.0,
     torch.float32),
]


class Cases(torch.nn.Module):
    def __init__(self, cases):
        super().__init__()
        self.cases = cases
        for i, case in enumerate(cases):
            for name, t in zip("abcd", case[0].tensors()):
                self.register_buffer(f"l{i}{name}", t)

    def forward(self, *flat):
        outs, pos = [], 0
        for i, (lay, _, _, _, _, bias, cap, _) in enumerate(self.cases):
            n = 4 if bias else 3
            q, k, v, *m = flat[pos:pos + n]
            pos += n
            lay_t = [getattr(self, f"l{i}{c}") for c in "abcd"]
            outs += list(bsa(q, k, v, *lay_t, m[0] if m else None, 0.3, lay.causal,
                             lay.block_q, lay.block_kv, cap))
        return tuple(outs)


def _inputs(cases):
    flat, want = [], []
    g = torch.Generator().manual_seed(0)
    for lay, b, hq, hkv, d, bias, cap, dtype in cases:
        L, S = lay.q_len, lay.kv_len
        q = torch.randn(b, hq, L, d, generator=g, dtype=dtype) * 3
        k = torch.randn(b, hkv, S, d, generator=g, dtype=dtype)
        v = torch.randn(b, hkv, S, d, generator=g, dtype=dtype)
        m = torch.randn(1, hq, L, S, generator=g, dtype=dtype) if bias else None
        flat += [q, k, v] + ([m] if bias else [])
        want += list(block_sparse_attention_ref(q, k, v, *lay.tensors(), m, 0.3, lay.causal,
                                                lay.block_q, lay.block_kv, cap))
    return tuple(flat), want


@pytest.mark.parametrize("form", ["gathered", "dense"])
def test_softcap_and_bias_forms_match_the_reference(form):
    inputs, want = _inputs(CASES)
    ctx = ExportContext(attention=form)
    with export_context(ctx), sparsec._util.quiet():
        onx = torch.onnx.export(Cases(CASES), inputs, dynamo=True,
                                custom_translation_table=sparsec.ops.onnx_translations())
    assert [s["form"] for s in ctx.sites] == [form] * len(CASES)
    model = onx.model_proto
    assert sum(n.op_type == "Tanh" for n in model.graph.node) == 2  # the two capped sites
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs)}
    got = [torch.from_numpy(o) for o in sess.run(None, feed)]
    for i, (g, w) in enumerate(zip(got, want)):
        tol = 1e-12 if w.dtype == f64 else 2e-6
        finite = torch.isfinite(w)
        assert torch.equal(finite, torch.isfinite(g)), i
        assert (g[finite] - w[finite]).abs().max().item() <= tol * max(
            1.0, w[finite].abs().max().item()), i
    # the cap changes the result: without it the first site's output differs
    uncapped = block_sparse_attention_ref(*inputs[:3], *CASES[0][0].tensors(), None, 0.3, True,
                                          16, 16)[0]
    assert (uncapped - got[0]).abs().max() > 1e-3


def test_contrib_refuses_a_softcap_so_auto_picks_gathered():
    geo = Geometry(hq=8, hkv=2, length=256, kv_length=256, d=128, dv=128, bq=64, bk=64, nq=4,
                   nkv=4, kp=1, kf=3, layout_heads=1, layout_batched=False, causal=True,
                   scale=0.1, softcap=50.0)
    half = ir.DataType.FLOAT16
    assert "soft-cap" in contrib_refusal(geo, half, False)
    assert "soft-cap" in contrib_refusal(geo, half, False, kernel=False)
    from sparsec.ops.onnx_attention import _choose

    ctx = ExportContext(attention="auto", provider="cuda")
    form, note = _choose(ctx, geo, half, False)
    assert form == "gathered" and "soft-cap" in note

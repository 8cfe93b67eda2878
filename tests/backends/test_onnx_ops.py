"""The ONNX translations of sparsec's attention ops, run in onnxruntime against the PyTorch ops.

Each export covers several cases at once (exporting is the slow part): awkward lengths, GQA,
per-head and per-batch layouts, cross-attention lengths, bool and float element masks, empty
rows, one block. Float64 cases compare at 1e-12 with the reference (itself checked against a
row-by-row oracle in tests/ops); the selection ops must choose exactly the same blocks.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import sparsec
from sparsec.layouts import BlockLayout, bigbird, dense, per_head, sliding_window
from sparsec.ops.attention_reference import block_sparse_attention_ref
from sparsec.ops.onnx_attention import Geometry, contrib_refusal
from sparsec.ops.onnx_common import ExportContext, export_context, ir

f64 = torch.float64
bsa = torch.ops.sparsec.block_sparse_attention


def _empty_row_layout() -> BlockLayout:
    """Query block 1 keeps nothing (its rows must output 0, lse −inf)."""
    keep = torch.tensor([[1, 0, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    return BlockLayout.from_dense_blocks(keep, 40, 40, 16, 16, causal=False)


def _batched_layout(batch: int, heads: int) -> BlockLayout:
    """A layout with batch and head dims, as the dynamic selectors make."""
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(batch, heads, 4, 5, generator=g) > 0.5
    return BlockLayout.from_dense_blocks(keep, 60, 70, 16, 16, causal=False)


# (layout, batch, q heads, kv heads, head dim, mask kind, dtype)
CASES = [
    (sliding_window(50, block=16, window=16, sink=8), 2, 4, 2, 8, None, f64),
    (per_head([bigbird(40, 72, block=16, window=16, global_tokens=16, random_blocks=1,
                       seed=s, causal=False) for s in range(4)]), 2, 4, 1, 8, None, f64),
    (sliding_window(50, block=16, window=32, sink=0), 2, 4, 2, 8, "bool", f64),
    (per_head([sliding_window(48, block=16, window=16), dense(48, block=16)] * 2), 1, 4, 2, 8,
     "float", f64),
    (_empty_row_layout(), 2, 2, 2, 8, None, f64),
    (dense(16, block=16), 1, 2, 1, 8, None, f64),
    (_batched_layout(2, 4), 2, 4, 2, 8, None, f64),
    (sliding_window(70, block=32, window=32, sink=32), 2, 6, 3, 16, "bool", torch.float32),
]


def _inputs(case, seed):
    lay, b, hq, hkv, d, mask_kind, dtype = case
    g = torch.Generator().manual_seed(seed)
    L, S = lay.q_len, lay.kv_len
    q = torch.randn(b, hq, L, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, S, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, S, d + 3, generator=g, dtype=dtype)
    mask = None
    if mask_kind == "bool":  # key padding, as a tokenizer's attention_mask gives
        mask = torch.rand(b, 1, 1, S, generator=g) > 0.3
    elif mask_kind == "float":
        mask = torch.randn(1, hq, L, S, generator=g, dtype=dtype)
        mask[..., 5] = float("-inf")
        mask[0, 1, 7] = float("-inf")  # a whole row masked: 0 output
    return q, k, v, mask


class Cases(torch.nn.Module):
    """Every case in one module: inputs are q, k, v (and mask) per case; outputs out, lse."""

    def __init__(self, cases):
        super().__init__()
        self.cases = cases
        for i, case in enumerate(cases):
            for name, t in zip("abcd", case[0].tensors()):
                self.register_buffer(f"l{i}{name}", t)

    def forward(self, *flat):
        outs, pos = [], 0
        for i, (lay, *_, mask_kind, _) in enumerate(self.cases):
            n = 4 if mask_kind else 3
            q, k, v, *m = flat[pos:pos + n]
            pos += n
            lay_t = [getattr(self, f"l{i}{c}") for c in "abcd"]
            out, lse = bsa(q, k, v, *lay_t, m[0] if m else None, 0.3, lay.causal, lay.block_q,
                           lay.block_kv)
            outs += [out, lse]
        return tuple(outs)


def _flat_inputs(cases, seed=0):
    flat = []
    for i, case in enumerate(cases):
        q, k, v, mask = _inputs(case, seed + i)
        flat += [q, k, v] + ([mask] if mask is not None else [])
    return tuple(flat)


def _export(module, inputs, attention="gathered"):
    ctx = ExportContext(attention=attention)
    with export_context(ctx), sparsec._util.quiet():
        onx = torch.onnx.export(module, inputs, dynamo=True,
                                custom_translation_table=sparsec.ops.onnx_translations())
    return onx.model_proto, ctx.sites


def _run(model, inputs):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs)}
    return [torch.from_numpy(o) for o in sess.run(None, feed)]


def _expected(cases, inputs):
    want, pos = [], 0
    for lay, *_, mask_kind, _ in cases:
        n = 4 if mask_kind else 3
        q, k, v, *m = inputs[pos:pos + n]
        pos += n
        want += list(block_sparse_attention_ref(q, k, v, *lay.tensors(), m[0] if m else None,
                                                0.3, lay.causal, lay.block_q, lay.block_kv))
    return want


# the dense form is the plain fallback: fewer cases (GQA ragged, float mask, empty rows, batched)
DENSE_CASES = [CASES[i] for i in (0, 3, 4, 6)]


@pytest.fixture(scope="module")
def exported():
    out = {}
    for form, cases in (("gathered", CASES), ("dense", DENSE_CASES)):
        inputs = _flat_inputs(cases)
        out[form] = (*_export(Cases(cases), inputs, form), inputs, cases)
    return out


@pytest.mark.parametrize("form", ["gathered", "dense"])
def test_forms_match_the_reference_on_awkward_cases(exported, form):
    model, sites, inputs, cases = exported[form]
    assert [s["form"] for s in sites] == [form] * len(cases)
    got = _run(model, inputs)
    want = _expected(cases, inputs)
    for i, (g, w) in enumerate(zip(got, want)):
        case = cases[i // 2]
        tol = 1e-12 if case[-1] == f64 else 2e-6
        assert g.dtype == w.dtype and g.shape == w.shape, i
        finite = torch.isfinite(w)
        assert torch.equal(finite, torch.isfinite(g)), f"output {i}: −inf rows differ"
        err = (g[finite] - w[finite]).abs().max().item() if finite.any() else 0.0
        assert err <= tol * max(1.0, w[finite].abs().max().item()), (i, err)
    empty = next(i for i, c in enumerate(cases) if c[0].q_len == 40 and c[3] == 2)
    out, lse = got[2 * empty], got[2 * empty + 1]
    assert (out[:, :, 16:32] == 0).all() and torch.isinf(lse[:, :, 16:32]).all()


def test_gathered_form_never_builds_the_dense_score_matrix(exported):
    """Every Softmax runs over the gathered columns (slots × block), fewer than the keys."""
    model = onnx.shape_inference.infer_shapes(exported["gathered"][0])
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(model.graph.value_info) + list(model.graph.input)}
    widths = [shapes[n.input[0]][-1] for n in model.graph.node if n.op_type == "Softmax"]
    assert len(widths) == len(CASES)
    lay = CASES[0][0]  # sliding window over 50 keys: 3 slots of 16 (1 partial, 2 full)
    slots = lay.kv_indices.shape[-1] + lay.full_kv_indices.shape[-1]
    assert widths[0] == slots * 16 == 48 < lay.kv_len
    dense_model = onnx.shape_inference.infer_shapes(exported["dense"][0])
    dshapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
               for v in dense_model.graph.value_info}
    first = next(n for n in dense_model.graph.node if n.op_type == "Softmax")
    assert dshapes[first.input[0]][-2:] == [50, 50]


# com.microsoft.SparseAttention --------------------------------------------------------------
def test_contrib_form_matches_on_onnxruntimes_cpu_kernel():
    """The CSR the translation builds, run by onnxruntime's CPU kernel (float32). That kernel
    needs past/present key buffers bound to the same memory, which only IO binding gives:
    the cache is made a graph input here, for the test."""
    lay = sliding_window(80, block=16, window=16, sink=16)
    case = (lay, 2, 4, 2, 16, None, torch.float32)
    q, k, v, _ = _inputs(case, 7)
    v = v[..., :16].contiguous()
    model, sites = _export(Cases([case]), (q, k, v), "contrib")
    assert sites[0]["form"] == "contrib"
    node = next(n for n in model.graph.node if n.op_type == "SparseAttention")
    assert node.domain == "com.microsoft"
    shape = [2, 2, 80, 16]
    for i, name in ((3, "past_key"), (4, "past_value")):
        node.input[i] = name
        model.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    for i, name in ((1, "present_key"), (2, "present_value")):
        node.output[i] = name
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    io = sess.io_binding()
    for inp, x in zip(sess.get_inputs(), (q, k, v)):
        io.bind_cpu_input(inp.name, x.numpy())
    io.bind_output(sess.get_outputs()[0].name)
    for name in ("key", "value"):
        cache = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32))
        io.bind_ortvalue_input(f"past_{name}", cache)
        io.bind_ortvalue_output(f"present_{name}", cache)
    sess.run_with_iobinding(io)
    got = torch.from_numpy(io.copy_outputs_to_cpu()[0])
    want = block_sparse_attention_ref(q, k, v, *lay.tensors(), None, 0.3, True, 16, 16)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


def _geo(**kw) -> Geometry:
    base = dict(hq=8, hkv=2, length=256, kv_length=256, d=128, dv=128, bq=64, bk=64, nq=4,
                nkv=4, kp=1, kf=3, layout_heads=1, layout_batched=False, causal=True,
                scale=0.1)
    return Geometry(**{**base, **kw})


def test_contrib_refusals_name_the_limit():
    half = ir.DataType.FLOAT16
    assert contrib_refusal(_geo(), half, False) is None
    assert "causal" in contrib_refusal(_geo(causal=False), half, False)
    assert "element mask" in contrib_refusal(_geo(), half, True)
    assert "per batch" in contrib_refusal(_geo(layout_batched=True), half, False)
    assert "float16/bfloat16" in contrib_refusal(_geo(), ir.DataType.FLOAT, False)
    assert "head size 128" in contrib_refusal(_geo(d=64, dv=64), half, False)
    assert contrib_refusal(_geo(d=64, dv=64), ir.DataType.FLOAT, False, kernel=False) is None


# selection ops ---------------------------------------------------------------------------------
class Select(torch.nn.Module):
    """Block scores, top-k, threshold and vertical-slash layouts of one q, k."""

    def __init__(self, L, S, causal, block):
        super().__init__()
        self.L, self.S, self.causal, self.block = L, S, causal, block

    def forward(self, q, k):
        ops, L, S, c, b = torch.ops.sparsec, self.L, self.S, self.causal, self.block
        probs = ops.block_scores(q, k, 0.25, c, b, b)
        top = ops.select_blocks(probs, L, S, c, b, b, 2, 0.0, 16, 16)
        mass = ops.select_blocks(probs, L, S, c, b, b, 0, 0.6, 0, 16)
        vs = ops.select_blocks_vertical_slash(q, k, 0.25, c, b, 8, 4, 16, 16) if L == S else ()
        return (probs, *top, *mass, *vs)


@pytest.mark.parametrize("L,S,causal", [(90, 90, True), (70, 100, False)])
def test_selection_ops_choose_the_same_blocks(L, S, causal):
    g = torch.Generator().manual_seed(L)
    q = torch.randn(2, 4, L, 8, generator=g)
    k = torch.randn(2, 2, S, 8, generator=g)
    module = Select(L, S, causal, 16)
    model, _ = _export(module, (q, k))
    got = _run(model, (q, k))
    want = module(q, k)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)  # the scores
    for i, (g_, w) in enumerate(zip(got[1:], want[1:]), start=1):
        assert g_.dtype == w.dtype == torch.int32, i
        assert torch.equal(g_, w), f"layout tensor {i} differs"

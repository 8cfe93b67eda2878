"""The onnx backend end to end: the issue's deployment check, parity failures, N:M metadata,
dynamic axes, the attention options and what the report says about them."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch.utils._pytree import tree_leaves

import sparsec
from sparsec.errors import BadInputError
from sparsec.ops.nm import apply_nm

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def _run_isolated(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Python with no site processing (so no editable sparsec) and only the stdlib and the
    environment's site-packages on its path: what a deployment box with onnxruntime has."""
    site = sysconfig.get_paths()["purelib"]
    prelude = f"import sys; sys.path.append({site!r})\n"
    return subprocess.run([sys.executable, "-I", "-S", "-c", prelude + textwrap.dedent(code)],
                          cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PATH": os.environ.get("PATH", "")})


DEPLOY_CHECK = """
import importlib.util, json
import numpy as np
import onnxruntime as ort
assert importlib.util.find_spec("sparsec") is None, "sparsec is importable"
sess = ort.InferenceSession("out/model.onnx", providers=["CPUExecutionProvider"])
x = np.load("tokens.npy")
want = np.load("want.npy")
name = sess.get_inputs()[0].name
(got,) = sess.run(None, {name: x})
(twice,) = sess.run(None, {name: np.concatenate([x, x])})  # batch 4: the batch is dynamic
err = float(np.abs(got - want).max() / np.abs(want).max())
err2 = float(np.abs(twice - np.concatenate([want, want])).max() / np.abs(want).max())
ops = sorted({n.op_type for n in __import__("onnx").load("out/model.onnx").graph.node}) \\
    if importlib.util.find_spec("onnx") else []
print(json.dumps({"err": err, "err_batch4": err2, "shape": list(twice.shape), "ops": ops}))
"""


def test_issue_check_deploys_deltas_and_window_sink_attention(run_cli, tmp_path):
    """`sparsec compile examples/tiny_llama_long.py --recipe R --deltas D --backend onnx -o out`
    with sparse deltas (non-zero, as after training) and a window + sink layout: out/model.onnx
    runs in onnxruntime without sparsec, matches the PyTorch program within 1e-4, has no
    delta tensors left and computes attention on gathered blocks."""
    from sparsec.training.deltas import extract_deltas, save_deltas

    recipe = EXAMPLES / "deploy_onnx.toml"
    program = sparsec.compile(EXAMPLES / "tiny_llama_long.py", recipe=recipe,
                              verify=False).program
    with torch.no_grad():
        for name, p in program.gm.named_parameters():
            if name.endswith("delta_values"):
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(len(name)))
    save_deltas(extract_deltas(program), tmp_path / "deltas.safetensors")
    (tokens,) = program.example_inputs
    with torch.no_grad():
        want = program.gm(tokens)  # the PyTorch program: sparse ops + block-sparse attention
    np.save(tmp_path / "tokens.npy", tokens.numpy())
    np.save(tmp_path / "want.npy", want.numpy())

    r = run_cli("compile", EXAMPLES / "tiny_llama_long.py", "--recipe", recipe, "--deltas",
                tmp_path / "deltas.safetensors", "--backend", "onnx", "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    o = report["onnx"]
    assert o["max_rel_err"] <= 1e-4 and o["merged_sparse_ops"] == 14
    assert o["checker"] == "full" and o["opset"] >= 18
    assert o["dynamic_axes"] == {"tokens": {"0": "batch"}}
    assert "sequence static" in o["static_axes"][0]
    assert o["second_shape"]["input_shapes"] == [[3, 256]]
    assert [s["form"] for s in o["attention"]["sites"]] == ["gathered", "gathered"]
    assert report["attention"]["density"]["value"] < 0.8  # the layout does skip blocks

    run = _run_isolated(DEPLOY_CHECK, tmp_path)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    assert got["err"] <= 1e-4 and got["err_batch4"] <= 1e-4, got
    assert got["shape"] == [4, 256, 256]
    with torch.no_grad():  # the deltas matter
        assert float((want - program.source.module(tokens)).abs().max()) > 1e-3

    # the base architecture: no delta tensor and no scatter of one into a weight
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert not [i.name for i in model.graph.initializer if "delta" in i.name]
    assert not [n.op_type for n in model.graph.node if n.op_type.startswith("Scatter")]


WRONG = """
import sys
sys.path.insert(0, {examples!r})
import torch
import sparsec.ops
from tiny_llama import *  # noqa: F401,F403


def _wrong(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, attn_mask,
           scale: float, causal: bool, block_q: int, block_kv: int):
    from sparsec.ops.onnx_attention import translate_attention
    from sparsec.ops.onnx_common import const, op

    out, lse = translate_attention(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks,
                                   full_kv_indices, attn_mask, scale, causal, block_q, block_kv)
    return op.Mul(out, const(1.01, "float32")), lse  # deliberately off by 1%


sparsec.ops.onnx_translation(torch.ops.sparsec.block_sparse_attention.default)(_wrong)
"""


def test_cli_exits_1_when_parity_is_off(run_cli, tmp_path):
    model = tmp_path / "wrong.py"
    model.write_text(WRONG.format(examples=str(EXAMPLES)))
    r = run_cli("compile", model, "--pass", "block-sparse-attention:block=16,window=16,sink=0",
                "--backend", "onnx", "--onnx-dynamic", "none", "-o", tmp_path / "out")
    assert r.returncode == 1, r.stderr
    assert r.stderr.count("\n") == 1 and "onnxruntime output differs from PyTorch" in r.stderr
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.fixture(scope="module")
def nm_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("nm") / "out"
    c = sparsec.compile(EXAMPLES / "tiny_llama.py", backend="onnx", out_dir=out,
                        passes=["sparse-finetune:method=nm,targets=['*.mlp.*']"])
    return c, onnx.load(str(out / "model.onnx"))


def test_nm_weights_keep_their_zeros_and_pattern_in_metadata(nm_export):
    compiled, model = nm_export
    meta = {p.key: p.value for p in model.metadata_props}
    nm = json.loads(meta["sparsec.nm"])
    assert len(nm) == 6 and all(e["n"] == 2 and e["m"] == 4 for e in nm)
    assert {e["weight"] for e in nm} == {f"layers.{i}.mlp.{p}_proj.weight"
                                         for i in (0, 1) for p in ("gate", "up", "down")}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for e in nm:  # every group of 4 along the input dim has at most 2 non-zeros
        w = np.moveaxis(inits[e["initializer"]], e["group_axis"], -1)
        groups = (w.reshape(*w.shape[:-1], -1, 4) != 0).sum(-1)
        assert groups.max() == 2 and (w == 0).mean() >= 0.5
    assert compiled.report["onnx"]["nm"] == nm


def test_dense_model_has_dynamic_batch_and_sequence(nm_export):
    compiled, model = nm_export
    o = compiled.report["onnx"]
    assert o["dynamic_axes"] == {"tokens": {"0": "batch", "1": "seq"}}
    assert o["second_shape"]["input_shapes"] == [[3, 31]]  # batch + 1, sequence - 1
    assert o["second_shape"]["max_rel_err"] <= 1e-4
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "seq"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["sparsec.dynamic_axes"]) == o["dynamic_axes"]
    assert o["opset"] == model.opset_import[0].version
    # the eager model with N:M-masked weights, at another batch and length within max_len
    eager = copy.deepcopy(compiled.program.source.module)
    with torch.no_grad():
        for e in o["nm"]:
            w = eager.get_parameter(e["weight"])
            w.copy_(apply_nm(w, e["n"], e["m"]))
        x = torch.randint(0, 256, (5, 20))
        want = eager(x)
    (got,) = compiled(x)  # the runner: the ONNX model in onnxruntime
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def attention_program():
    """tiny_llama at 64 tokens with a sliding window in blocks of 16 (GQA, causal)."""
    program = sparsec.trace_file(EXAMPLES / "tiny_llama.py")
    tl = program.source.module
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    program = sparsec.trace(tl, (tokens,))
    return sparsec.compile(program, passes=["block-sparse-attention:block=16,window=16,sink=16"],
                           verify=False).program


@pytest.mark.parametrize("options,forms,note", [
    ({"attention": "dense", "dynamic": "none"}, ["dense"] * 2, None),
    ({"provider": "cuda", "dynamic": "none"}, ["gathered"] * 2,
     "com.microsoft.SparseAttention not used: the CUDA kernel takes float16/bfloat16"),
])
def test_attention_options_and_their_notes(attention_program, options, forms, note):
    c = sparsec.lower(attention_program, "onnx", sparsec.LowerOptions(extra=options))
    o = c.report["onnx"]
    assert [s["form"] for s in o["attention"]["sites"]] == forms
    assert [s["module"] for s in o["attention"]["sites"]] == ["layers.0.attn", "layers.1.attn"]
    assert o["max_rel_err"] <= 1e-4 and o["dynamic_axes"] == {}
    if note:
        assert any(n.startswith(note) for n in c.notes), c.notes
        assert "no CUDA execution provider here" in " ".join(c.notes)


def test_contrib_without_cuda_refuses_to_claim_parity(attention_program):
    with pytest.raises(BadInputError, match="CUDA execution provider only"):
        sparsec.lower(attention_program, "onnx", sparsec.LowerOptions(
            extra={"attention": "contrib", "dynamic": "none"}))


@pytest.mark.parametrize("layout", ["topk", "learned"])
def test_dynamic_layout_exports_with_dynamic_batch(attention_program, layout):
    """Selection in the graph, then gathered blocks with data-dependent indices; a learned
    gate's trained weights reach the re-traced (dynamic-batch) program by name."""
    program = sparsec.compile(attention_program.source.module,
                              attention_program.example_inputs, verify=False,
                              passes=[f"block-sparse-attention:layout={layout},topk=1,block=16,"
                                      "window=16,sink=16"]).program
    with torch.no_grad():
        for name, p in program.gm.named_parameters():
            if ".gates." in name:  # as if trained: no longer the identity it starts as
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    c = sparsec.lower(program, "onnx")
    o = c.report["onnx"]
    assert o["max_rel_err"] <= 1e-4 and o["dynamic_axes"] == {"tokens": {"0": "batch"}}
    assert o["second_shape"]["max_rel_err"] <= 1e-4
    assert {s["layout"] for s in o["attention"]["sites"]} == {layout}
    assert {s["form"] for s in o["attention"]["sites"]} == {"gathered"}


@pytest.mark.parametrize("extra,match", [
    ({"attention": "sparse"}, "attention = 'sparse'; choose one of auto, gathered"),
    ({"provider": "tpu"}, "provider = 'tpu'"),
    ({"dynamc": "none"}, "unknown onnx backend option 'dynamc'"),
    ({"opset": 9}, "opset 9 is not supported"),
])
def test_bad_options_are_one_line_errors(attention_program, extra, match):
    with pytest.raises(BadInputError, match=match):
        sparsec.lower(attention_program, "onnx", sparsec.LowerOptions(extra=extra))


def test_onnx_options_need_the_onnx_backend(run_cli, tiny_llama_path):
    r = run_cli("compile", tiny_llama_path, "--onnx-attention", "dense")
    assert r.returncode == 2 and "--onnx-attention is an option of the onnx backend" in r.stderr


def test_training_step_program_deploys_its_forward_graph(tiny_llama_path, tmp_path):
    """A recipe that ends in the joint-graph passes exports the forward graph it keeps (deltas
    merged, no optimizer state), with dynamic batch and sequence like any forward program."""
    passes = ["sparse-finetune:method=delta,density=0.05", "joint-graph:lr=0.01",
              "prune-backward", "reduce-saved", "optimizer-in-backward"]
    c = sparsec.compile(tiny_llama_path, passes=passes, backend="onnx", out_dir=tmp_path / "o")
    o = c.report["onnx"]
    assert o["max_rel_err"] <= 1e-4 and o["merged_sparse_ops"] == 14
    assert o["dynamic_axes"] == {"tokens": {"0": "batch", "1": "seq"}}
    model = onnx.load(str(tmp_path / "o" / "model.onnx"))
    names = [i.name for i in model.graph.initializer]
    assert not [n for n in names if "optim" in n or "delta" in n], names
    assert [i.name for i in model.graph.input] == ["tokens"]


def test_a_model_onnxruntime_cannot_load_is_a_clear_error(tiny_llama_path):
    """bfloat16: onnxruntime's CPU provider lacks kernels (Mul); a one-line BadInputError with
    the fix, and under --no-verify a note instead."""
    tl = sparsec.load_model_file(tiny_llama_path).module
    model = tl.model().to(torch.bfloat16)
    with pytest.raises(BadInputError, match="export in float32 or float16"):
        sparsec.compile(model, tl.example_inputs(), backend="onnx")
    c = sparsec.compile(model, tl.example_inputs(), backend="onnx", verify=False)
    assert c.report["onnx"]["parity_on"] == "none (--no-verify)"
    assert any("parity not checked" in n for n in c.notes)


class _Causal(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.gpu
def test_contrib_form_runs_on_onnxruntime_cuda(tmp_path):
    """The exported com.microsoft.SparseAttention (float16, head size 128, blocks of 64) runs
    in onnxruntime's CUDA execution provider and matches the PyTorch program."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA execution provider (onnxruntime-gpu not installed)")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 512, 128, generator=g).half() for _ in range(3))
    c = sparsec.compile(_Causal(), (q, k, v), backend="onnx", out_dir=tmp_path / "o",
                        passes=["block-sparse-attention:block=64,window=128,sink=64"],
                        backend_options={"attention": "contrib", "provider": "cuda",
                                         "dynamic": "none"})
    o = c.report["onnx"]
    assert [s["form"] for s in o["attention"]["sites"]] == ["contrib"]
    assert o["parity_on"] == "cuda" and o["max_rel_err"] <= 2e-2


@pytest.mark.gpu
def test_program_on_cuda_exports_from_a_cpu_copy(tiny_llama_path, tmp_path):
    """A model traced on CUDA, with a sparse fine-tuning pass: exported from a CPU copy,
    parity checked in onnxruntime, the program left on CUDA and outputs returned there."""
    tl = sparsec.load_model_file(tiny_llama_path).module
    cuda = torch.device("cuda")
    inputs = tuple(t.to(cuda) for t in tl.example_inputs())
    c = sparsec.compile(tl.model().to(cuda), inputs, backend="onnx", out_dir=tmp_path / "o",
                        passes=["sparse-finetune:method=delta,density=0.05"])
    o = c.report["onnx"]
    assert o["max_rel_err"] <= 1e-4 and o["dynamic_axes"]
    assert any("CPU copy" in n and "cuda" in n for n in c.notes), c.notes
    assert all(p.device.type == "cuda" for p in c.program.gm.parameters())
    out = c(*inputs)
    want = c.program.gm(*inputs)
    got, ref = (torch.utils._pytree.tree_leaves(x)[0] for x in (out, want))
    assert got.device.type == "cuda"
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hf_model_on_cuda_exports_with_a_dynamic_batch(name, tmp_path):
    """An HF model traced on CUDA re-traces its eager module with dynamic axes from the CPU
    copy too (the module came along), so onnxruntime takes another batch size."""
    from sparsec.testing import zoo

    zm = zoo.get(name).build("cuda", seq=64)
    c = sparsec.compile(zm.model, zm.example_inputs, backend="onnx", out_dir=tmp_path / "o")
    assert c.report["onnx"]["dynamic_axes"], c.notes
    assert not any(n.startswith("static shapes") for n in c.notes), c.notes
    other = zm.inputs(batch=zm.batch + 1, seed=7)
    got = tree_leaves(c(*other))[0]
    with torch.no_grad():
        want = tree_leaves(zm.model(*other))[0]
    assert got.device.type == "cuda"
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)

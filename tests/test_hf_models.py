"""Real architectures from transformers trace, run through the pipeline and export to ONNX."""

import pytest
import torch

import sparsec
from sparsec.testing.hf import HF_MODELS, hf_model


@pytest.mark.parametrize("name", HF_MODELS)
def test_hf_model_traces_compiles_and_exports(name):
    model, inputs = hf_model(name)
    program = sparsec.trace(model, inputs)
    assert program.call_nodes(torch.ops.aten.linear.default)
    compiled = sparsec.compile(program, passes=["dead-code"], backend="onnx")
    assert compiled.program.state["verify"]["max_rel_err"] <= 1e-5
    assert compiled.report["onnx"]["max_rel_err"] <= 1e-4
    with torch.no_grad():
        want = model(*inputs)
    want = want.logits if hasattr(want, "logits") else want.last_hidden_state
    got = compiled(*inputs)[0]
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)

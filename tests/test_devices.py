"""sparsec.devices.copy_to: a program and its model source's module copied to a device."""

import pytest
import torch
from torch.utils._pytree import tree_leaves

import sparsec
from sparsec.devices import copy_to


def _first(out):
    return tree_leaves(out)[0]


def _traced(tiny_llama_path, device="cpu"):
    tl = sparsec.load_model_file(tiny_llama_path).module
    inputs = tuple(t.to(device) for t in tl.example_inputs())
    return sparsec.trace(tl.model().to(device), inputs), inputs


def test_copy_is_independent_and_keeps_graph_and_module_sharing(tiny_llama_path):
    program, inputs = _traced(tiny_llama_path)
    copy = copy_to(program, torch.device("cpu"))
    assert copy.gm is not program.gm and copy.source.module is not program.source.module
    originals = {id(p) for p in program.gm.parameters()}
    graph = {id(p) for p in copy.gm.parameters()}
    module = {id(p) for p in copy.source.module.parameters()}
    assert not graph & originals
    # the traced graph and the eager module share their weights; the copies do too
    assert {id(p) for p in program.source.module.parameters()} == originals
    assert graph == module
    torch.testing.assert_close(_first(copy.gm(*copy.example_inputs)),
                               _first(program.gm(*inputs)), rtol=0, atol=0)
    before = _first(program.gm(*inputs))
    with torch.no_grad():
        next(copy.gm.parameters()).add_(1.0)
    assert torch.equal(_first(program.gm(*inputs)), before)
    assert not torch.equal(_first(copy.gm(*copy.example_inputs)), before)


@pytest.mark.gpu
def test_cuda_program_copied_to_the_cpu(tiny_llama_path):
    program, inputs = _traced(tiny_llama_path, "cuda")
    copy = copy_to(program, torch.device("cpu"))
    tensors = [*copy.gm.parameters(), *copy.gm.buffers(), *copy.source.module.parameters(),
               *copy.source.module.buffers(), *tree_leaves(copy.example_inputs)]
    assert all(t.device.type == "cpu" for t in tensors if isinstance(t, torch.Tensor))
    assert all(p.device.type == "cuda" for p in program.gm.parameters())
    torch.testing.assert_close(_first(copy.gm(*copy.example_inputs)),
                               _first(program.gm(*inputs)).cpu(), rtol=1e-4, atol=1e-5)


def test_retarget_graph_reaches_nested_graphs():
    """On CUDA, HF rotary embeddings trace to an autocast-disabled higher-order op whose body
    is a graph of its own; the device checks there must move too (a CPU copy of a Llama
    traced on the GPU failed on them)."""
    from sparsec.devices import retarget_graph

    g = torch.fx.Graph()
    x = g.placeholder("x")
    r = g.call_function(torch.ops.aten.arange.default, (4,), {"device": torch.device("cpu")})
    g.output(g.call_function(torch.ops.aten.add.Tensor, (x, r)))
    inner = torch.fx.GraphModule(torch.nn.Module(), g)
    outer = torch.fx.symbolic_trace(lambda x: x * 2)
    outer.add_submodule("body", inner)
    retarget_graph(outer, torch.device("cuda"))
    named = [a for n in inner.graph.nodes for a in n.kwargs.values()
             if isinstance(a, torch.device)]
    assert named == [torch.device("cuda")]
    assert "cuda" in inner.code

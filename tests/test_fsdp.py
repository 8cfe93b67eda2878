"""sparsec.fsdp: the per-block staged graph computes what the flat graph does (the FSDP2 runs
themselves are in tests/test_distributed.py)."""

from __future__ import annotations

import torch
from hypothesis import given

import sparsec
from sparsec import BadInputError, run_passes
from sparsec.fsdp import block_key, stage_by_blocks
from sparsec.passes.sparse_finetune import SparseFinetune
from sparsec.testing import strategies as sst
from sparsec.testing.pytest_plugin import examples


def _outputs_and_grads(module, program, inputs):
    for _, p in program.trainable_parameters():
        p.grad = None
    out = module(*inputs)
    if out.requires_grad:  # a drawn model may have no parameters at all (e.g. one ReLU)
        out.float().square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in program.trainable_parameters()
                          if p.grad is not None}


def _check_same(program, inputs, staged):
    with torch.no_grad():  # nonzero deltas, so their gradients flow through every stage
        for _, p in program.trainable_parameters():
            p.copy_(torch.linspace(-0.1, 0.1, p.numel()).reshape(p.shape).to(p.dtype))
    flat_out, flat_grads = _outputs_and_grads(program.gm, program, inputs)
    out, grads = _outputs_and_grads(staged, program, inputs)
    assert torch.equal(out, flat_out)
    assert grads.keys() == flat_grads.keys()
    for n in grads:
        assert torch.equal(grads[n], flat_grads[n]), n


def test_block_key():
    assert block_key("layers.3.mlp.up_proj") == "layers.3"
    assert block_key("model.layers.12.self_attn") == "model.layers.12"
    assert block_key("embed") is None and block_key("") is None


def test_tiny_llama_stages_own_their_blocks(tiny_llama_program):
    program = run_passes(tiny_llama_program, [SparseFinetune(density=0.05)], verify=False)
    staged, units = stage_by_blocks(program.gm)
    assert units == ["stage_layers_0", "stage_layers_1"]
    params = dict(staged.named_parameters())
    # each block's weights, sparse values and indices live in its stage; the tied embedding
    # (used first and last) and the final norm stay on the root
    assert params["stage_layers_1.layers.1.mlp.up_proj.weight"] is \
        program.gm.get_parameter("layers.1.mlp.up_proj.weight")
    assert "stage_layers_0.layers.0.attn.q_proj.delta_values" in params
    assert "embed.weight" in params and "norm.weight" in params
    assert "stage_layers_0.layers.0.attn.q_proj.delta_indices" in dict(staged.named_buffers())
    assert sum(p.numel() for p in staged.parameters()) == program.param_counts()["total"]
    _check_same(program, program.example_inputs, staged)


class _SharedAcrossBlocks(torch.nn.Module):
    """A weight used by two blocks must stay on the root (one FSDP unit may own it)."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))
        self.blocks[2].weight = self.blocks[0].weight

    def forward(self, x):
        for b in self.blocks:
            x = torch.relu(b(x))
        return x


def test_a_weight_shared_by_two_blocks_stays_on_the_root():
    torch.manual_seed(0)
    program = sparsec.trace(_SharedAcrossBlocks(), (torch.randn(3, 8),))
    program = run_passes(program, [SparseFinetune(density=0.25, targets=("blocks.1",))],
                         verify=False)
    staged, units = stage_by_blocks(program.gm)
    names = {n for n, _ in staged.named_parameters()}
    shared = [n for n in names if n.endswith("blocks.0.weight")]
    assert shared == ["blocks.0.weight"], names  # on the root, not inside a stage
    assert "stage_blocks_1.blocks.1.delta_values" in names
    _check_same(program, program.example_inputs, staged)


@examples(6)
@given(sst.models(attention=True, look_alikes=False, max_layers=3))
def test_staging_random_models_is_exact(model):
    inputs = sst.inputs_for(model)
    program = sparsec.trace(model, inputs)
    try:
        program = run_passes(program, [SparseFinetune(density=0.25, select="random")],
                             verify=False)
    except BadInputError:  # no linear layer in a block: every parameter trains instead
        pass
    staged, units = stage_by_blocks(program.gm)
    assert len(units) >= 1
    _check_same(program, inputs, staged)

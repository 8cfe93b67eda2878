"""The triton backend: references with a note on the CPU; kernels, verified against the
references, on a GPU (`-m gpu`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sparsec
from sparsec.backends.triton import program_device, sparsec_ops
from sparsec.passes.attention import BlockSparseAttention


class Attn(torch.nn.Module):
    def __init__(self, dim=64, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, L, d = x.shape
        q, k, v = self.qkv(x).view(b, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, L, d))


def _program(device, dtype=torch.float32, L=64):
    torch.manual_seed(0)
    model = Attn().to(device, dtype).eval()
    x = torch.randn(2, L, 64, device=device, dtype=dtype)
    return sparsec.trace(model, (x,))


def test_cpu_program_runs_references_with_a_note():
    program = _program("cpu")
    compiled = sparsec.compile(program, passes=[BlockSparseAttention(
        layout="sliding-window", window=16, sink=16, block=16)], backend="triton")
    section = compiled.report["triton"]
    assert section["device"] == "cpu" and section["kernels"] == []
    assert section["ops"] == ["block_sparse_attention"] and "CUDA" in section["fallback"]
    assert compiled.notes and "reference" in compiled.notes[0]
    out = compiled(*program.example_inputs)
    assert torch.isfinite(out).all()
    assert compiled.summary["triton"] == section


def test_helpers_find_ops_and_device():
    program = _program("cpu")
    assert sparsec_ops(program) == [] and program_device(program) == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_program_runs_on_kernels_and_matches_references(dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    program = _program("cuda", dtype, L=256)
    compiled = sparsec.compile(program, passes=[BlockSparseAttention(
        layout="sliding-window", window=64, sink=32, block=32)], backend="triton")
    section = compiled.report["triton"]
    assert section["fallback"] is None and section["device"].startswith("cuda")
    assert section["kernels"] == ["block_sparse_attention", "block_sparse_attention_backward"]
    assert section["parity"]["max_rel_err"] <= section["parity"]["rtol"]
    x = program.example_inputs[0]
    assert compiled(x).shape == x.shape


def test_parity_check_runs_kernels_against_references(monkeypatch):
    """The verification path, on the CPU (where the launchers take their reference paths):
    it must run both and report the comparison."""
    import sparsec.backends.triton as backend

    monkeypatch.setattr(backend, "_fallback_reason", lambda device: None)
    program = _program("cpu")
    compiled = sparsec.compile(program, passes=[BlockSparseAttention(
        layout="sliding-window", window=16, sink=16, block=16)], backend="triton")
    section = compiled.report["triton"]
    assert section["kernels"] == ["block_sparse_attention", "block_sparse_attention_backward"]
    assert section["parity"]["max_rel_err"] <= section["parity"]["rtol"]
    assert not compiled.notes

"""A dynamic layout is verified under the blocks the rewritten program selected (issue 17,
item 3): when the op's block scores round differently from the reference's (the Triton kernel
in bf16 does), near-tied blocks may be chosen otherwise there, and recomputing the selection
in the reference turned that into a false verification failure."""

from __future__ import annotations

import pytest
import torch

import sparsec
from sparsec.errors import VerificationError
from sparsec.ops import block_select
from sparsec.passes.attention import BlockSparseAttention


class Uniform(torch.nn.Module):
    """Attention whose scores are all equal (q = 0): every block ties."""

    def __init__(self):
        super().__init__()
        self.q, self.kv = torch.nn.Linear(16, 16, bias=False), torch.nn.Linear(16, 32)
        torch.nn.init.zeros_(self.q.weight)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 2, 8).transpose(1, 2)
        k, v = (z.view(b, t, 2, 8).transpose(1, 2) for z in self.kv(x).split(16, -1))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)


@pytest.fixture
def kernel_rounding(monkeypatch):
    """The op's block scores with a tiny deterministic perturbation, as a kernel's own
    rounding would give; the reference's scores stay exact."""
    exact = block_select.pooled_block_scores

    def rounded(q, k, *args):
        s = exact(q, k, *args)
        g = torch.Generator().manual_seed(0)
        return s + 1e-6 * torch.rand(s.shape, generator=g).to(s)

    monkeypatch.setattr(block_select, "pooled_block_scores", rounded)


def _program():
    torch.manual_seed(0)
    return sparsec.trace(Uniform().eval(), (torch.randn(2, 64, 16),))


def _topk():
    return [BlockSparseAttention(layout="topk", topk=1, window=0, sink=0, block=16)]


def test_ties_broken_otherwise_by_the_op_pass_verification(kernel_rounding):
    out = sparsec.run_passes(_program(), _topk(), verify=True)
    record = out.history[-1].verify
    assert record["reference"] == "dense attention under the blocks each site selected"
    assert record["max_rel_err"] < 1e-5


def test_recomputing_the_selection_in_the_reference_fails_there(kernel_rounding, monkeypatch):
    """The same check with the reference selecting on its own (the old way) fails: the case
    above really has ties broken the other way."""
    monkeypatch.setattr(BlockSparseAttention, "_selected_blocks", lambda self, p: None)
    with pytest.raises(VerificationError):
        sparsec.run_passes(_program(), _topk(), verify=True)

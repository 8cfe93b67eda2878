"""tools/probe_ws.py's kernel (the forward read through tensor descriptors, the shape Triton's
warp specialization needs) against the float64 reference, without specialization: on the CPU
under Triton's interpreter, on a ragged length with GQA and sub-tiles, so the probe stays a
correct baseline for the day a Triton release specializes it correctly."""

from __future__ import annotations

import contextvars
import importlib.util
import math
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from sparsec.layouts import sliding_window  # noqa: E402
from sparsec.ops.attention_reference import block_sparse_attention_ref  # noqa: E402
from sparsec.testing.kernels import kernel_device, rel_err  # noqa: E402

DEV = kernel_device()
TOOL = Path(__file__).resolve().parents[2] / "tools" / "probe_ws.py"


def _probe():
    spec = importlib.util.spec_from_file_location("probe_ws", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(probe, q, k, v, layout, scale):
    """The descriptors need a scratch allocator: set it only inside a copied context."""
    def go():
        triton.set_allocator(lambda size, align, stream: torch.empty(
            size, dtype=torch.int8, device=q.device))
        return probe.ws_forward(q, k, v, layout, scale, (64, 32, 4, 2), ws=False)
    return contextvars.copy_context().run(go)


def test_descriptor_forward_matches_reference():
    probe = _probe()
    g = torch.Generator().manual_seed(0)
    L, D = 300, 64
    q = torch.randn(1, 4, L, D, generator=g).to(DEV, torch.float16)
    k, v = (torch.randn(1, 2, L, D, generator=g).to(DEV, torch.float16) for _ in range(2))
    layout = sliding_window(L, window=128, sink=64, block=64).to(DEV)
    scale = 1 / math.sqrt(D)
    out, lse = _run(probe, q, k, v, layout, scale)
    want, want_lse = block_sparse_attention_ref(q.double(), k.double(), v.double(),
                                                *layout.tensors(), None, scale, True, 64, 64)
    assert rel_err(out, want) < 2e-3
    assert rel_err(lse, want_lse) < 1e-4

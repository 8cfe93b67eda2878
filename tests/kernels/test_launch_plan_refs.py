"""A stored launch plan keeps no reference to the per-call (slot) tensors of its first call
(issue 17: plans made while the joint graph was traced held q, k, v, out, lse of that real
run, and through q's autograd graph a whole forward's activations, for the program's life)."""

from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from sparsec.kernels import _launch  # noqa: E402


def test_direct_launch_keeps_no_slot_tensor():
    params = [SimpleNamespace(name=n) for n in ("q", "idx", "out", "n")]
    kernel = SimpleNamespace(params=params)
    compiled = SimpleNamespace(run=lambda *a: None, function=0, packed_metadata=None)
    q, out = torch.randn(4, requires_grad=True) * 2, torch.empty(4)  # q has a grad_fn
    idx = torch.zeros(2, dtype=torch.int32)
    refs = [weakref.ref(q), weakref.ref(out)]
    launch = _launch._direct(kernel, (1,), (q, idx, out, 4), {}, (0, 2), 0, compiled)
    assert launch.args[0] is None and launch.args[2] is None
    assert launch.args[1] == idx.data_ptr() and launch.keep == [idx]
    del q, out
    gc.collect()
    assert all(r() is None for r in refs)

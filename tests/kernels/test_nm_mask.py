"""N:M mask and SR-STE kernels against the plain-torch references (ties included: the earlier
element wins). CPU: Triton's interpreter at small sizes; GPU (`-m gpu`): real sizes and the
ops' CUDA registrations."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from sparsec.kernels import nm_mask as K  # noqa: E402
from sparsec.testing.kernels import kernel_device, rel_err  # noqa: E402

DEV = kernel_device()


def weight(rows, cols, dtype, seed, ties=False, device=DEV):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    if ties:  # few distinct magnitudes, both signs: ranks decided by position
        w = torch.randint(-2, 3, (rows, cols), generator=g).float()
    return w.to(device, dtype)


CASES = [(2, 4, 24, 40), (4, 8, 7, 64), (1, 2, 5, 6), (8, 16, 3, 96), (16, 32, 4, 64)]


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("n,m,rows,cols", CASES)
def test_mask_matches_reference(n, m, rows, cols, ties):
    w = weight(rows, cols, torch.float32, seed=n * m, ties=ties)
    got = K.nm_mask(w, n, m)
    want = K.nm_mask_ref(w.cpu(), n, m)
    assert got.dtype == torch.bool and torch.equal(got.cpu(), want)
    assert (got.view(rows, cols // m, m).sum(-1) == n).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_and_srste(dtype):
    w = weight(12, 64, dtype, seed=3)
    mask = K.nm_mask_ref(w.cpu(), 2, 4)
    assert torch.equal(K.nm_apply(w, 2, 4).cpu(), (w.cpu() * mask))
    dense = weight(12, 64, dtype, seed=4)
    want = K.srste_ref(dense.cpu().double(), w.cpu().double(), mask, 0.3)
    for given in (None, mask.to(DEV)):
        got = K.nm_srste_(dense.clone(), w, 0.3, n=2, m=4, mask=given)
        assert rel_err(got.cpu(), want) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_odd_m_uses_the_reference():
    w = weight(4, 12, torch.float32, seed=0)
    assert torch.equal(K.nm_mask(w, 2, 3).cpu(), K.nm_mask_ref(w.cpu(), 2, 3))


def test_matches_the_op_reference_without_ties():
    ops = pytest.importorskip("sparsec.ops.nm")
    w = weight(16, 64, torch.float32, seed=9)
    assert torch.equal(K.nm_mask(w, 2, 4).cpu(), ops.nm_mask_ref(w.cpu(), 2, 4))


# GPU ----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (8, 32)])
def test_gpu_mask_apply_srste(n, m):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    w = weight(4096, 4096, torch.bfloat16, seed=m, device="cuda")
    mask = K.nm_mask(w, n, m)
    assert torch.equal(mask, K.nm_mask_ref(w, n, m))
    assert torch.equal(K.nm_apply(w, n, m), w * mask)
    dense = torch.randn_like(w)
    got = K.nm_srste_(dense.clone(), w, 2e-4, n=n, m=m)
    want = K.srste_ref(dense.double(), w.double(), mask, 2e-4)
    assert rel_err(got, want) < 1e-2


@pytest.mark.gpu
def test_gpu_ops_use_the_kernels(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    used = []
    for name in ("nm_mask", "nm_apply", "nm_srste_"):
        real = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _r=real, _n=name, **k: used.append(_n) or
                            _r(*a, **k))
    w = weight(256, 128, torch.float32, seed=1, device="cuda").requires_grad_()
    x = torch.randn(4, 32, 128, device="cuda", requires_grad=True)
    y = torch.ops.sparsec.nm_linear(x, w, None, 2, 4, 1e-3)
    y.square().sum().backward()
    mask = K.nm_mask_ref(w.detach(), 2, 4)
    assert torch.equal(torch.ops.sparsec.nm_mask(w.detach(), 2, 4), mask)
    want = torch.nn.functional.linear(x, w * mask)
    assert rel_err(y, want) < 1e-5 and torch.isfinite(w.grad).all()
    assert {"nm_mask", "nm_apply", "nm_srste_"} <= set(used)

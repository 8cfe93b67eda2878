import pytest
import torch

import sparsec.ops.sparse_delta as sd


OPS = torch.ops.sparsec


def _case(shape_x, out_f, in_f, k, dtype=torch.float64, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape_x, in_f, generator=g, dtype=dtype)
    w = torch.randn(out_f, in_f, generator=g, dtype=dtype)
    b = torch.randn(out_f, generator=g, dtype=dtype) if bias else None
    idx = torch.randperm(out_f * in_f, generator=g)[:k].sort().values
    vals = torch.randn(k, generator=g, dtype=dtype)
    return x, w, b, idx, vals


def _dense_delta(w, idx, vals):
    # independent of apply_delta: build Δ row by row from (row, col) pairs
    d = torch.zeros_like(w)
    d[idx // w.shape[1], idx % w.shape[1]] = vals
    return d


SHAPES = [((5,), 7, 3, 1), ((2, 3), 5, 11, 9), ((1, 13), 6, 6, 36), ((4,), 1, 1, 1)]


@pytest.mark.parametrize("shape_x,out_f,in_f,k", SHAPES)
def test_forward_matches_dense(shape_x, out_f, in_f, k):
    x, w, b, idx, vals = _case(shape_x, out_f, in_f, k)
    got = OPS.sparse_delta_linear(x, w, b, idx, vals)
    want = x @ (w + _dense_delta(w, idx, vals)).T + b
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape_x,out_f,in_f,k", SHAPES)
def test_sampled_grad_is_the_gathered_dense_gradient(shape_x, out_f, in_f, k, monkeypatch):
    monkeypatch.setattr(sd, "SAMPLED_CHUNK_ELEMENTS", 7)  # force many chunks
    x, w, _, idx, _ = _case(shape_x, out_f, in_f, k)
    g = torch.randn(*shape_x, out_f, dtype=torch.float64)
    want = torch.einsum("...o,...i->oi", g, x).reshape(-1)[idx]
    for got in (OPS.sampled_grad(g, x, idx, in_f), sd.sampled_grad_ref(g, x, idx, in_f),
                sd.sampled_grad_csr(g, x, idx, in_f)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_sampled_grad_low_precision_accumulates_in_float32():
    x, w, _, idx, _ = _case((64,), 8, 16, 20, dtype=torch.float32)
    g = torch.randn(64, 8)
    want = (g.double().T @ x.double()).reshape(-1)[idx]
    got = OPS.sampled_grad(g.bfloat16(), x.bfloat16(), idx, 16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=0.15)


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(bias):
    x, w, b, idx, vals = _case((2, 3), 5, 7, 6, bias=bias)
    x.requires_grad_(True)
    vals.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, b, v: OPS.sparse_delta_linear(x, w, b, idx, v),
                                    (x, b, vals))


def test_frozen_weight_gets_no_grad_and_trained_weight_gets_dense_grad():
    x, w, b, idx, vals = _case((3,), 4, 5, 3)
    vals.requires_grad_(True)
    OPS.sparse_delta_linear(x, w, b, idx, vals).sum().backward()
    assert w.grad is None and vals.grad is not None
    w2 = w.clone().requires_grad_(True)
    OPS.sparse_delta_linear(x, w2, b, idx, vals.detach()).square().sum().backward()
    w3 = w.clone().requires_grad_(True)
    (x @ (w3 + _dense_delta(w, idx, vals.detach())).T + b).square().sum().backward()
    torch.testing.assert_close(w2.grad, w3.grad)


def test_opcheck():
    x, w, b, idx, vals = _case((2, 3), 5, 7, 6, dtype=torch.float32)
    torch.library.opcheck(OPS.sparse_delta_linear.default,
                          (x.requires_grad_(), w, b, idx, vals.requires_grad_()))
    g = torch.randn(2, 3, 5)
    torch.library.opcheck(OPS.sampled_grad.default, (g, x.detach(), idx, 7))
    torch.library.opcheck(OPS.sparse_delta_grad_input.default, (g, w, idx, vals.detach()))


def test_joint_graph_shows_the_backward_ops_by_name(backward_targets):
    x, w, b, idx, vals = _case((2, 3), 5, 7, 6, dtype=torch.float32)
    targets = backward_targets(OPS.sparse_delta_linear, x.requires_grad_(), w, b, idx,
                               vals.requires_grad_())
    assert "sparsec.sampled_grad.default" in targets
    assert "sparsec.sparse_delta_grad_input.default" in targets

import pytest
import torch


OPS = torch.ops.sparsec


def _case(shape_x, out_f, in_f, s, axis, dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape_x, in_f, generator=g, dtype=dtype)
    w = torch.randn(out_f, in_f, generator=g, dtype=dtype)
    b = torch.randn(out_f, generator=g, dtype=dtype) if bias else None
    n_sel = out_f if axis == 0 else in_f
    index = torch.randperm(n_sel, generator=g)[:s].sort().values
    shape = (s, in_f) if axis == 0 else (out_f, s)
    delta = torch.randn(*shape, generator=g, dtype=dtype)
    return x, w, b, index, delta


def _dense(w, index, delta, axis):
    d = torch.zeros_like(w)
    for j, i in enumerate(index.tolist()):  # independent of index_add: one slice at a time
        if axis == 0:
            d[i] = delta[j]
        else:
            d[:, i] = delta[:, j]
    return w + d


CASES = [((5,), 7, 3, 1, 0), ((2, 3), 5, 11, 4, 1), ((1, 13), 6, 6, 6, 0), ((3,), 1, 9, 2, 1)]


@pytest.mark.parametrize("shape_x,out_f,in_f,s,axis", CASES)
def test_forward_and_slice_grad_match_dense(shape_x, out_f, in_f, s, axis):
    x, w, b, index, delta = _case(shape_x, out_f, in_f, s, axis)
    got = OPS.structured_linear(x, w, b, index, delta, axis)
    torch.testing.assert_close(got, x @ _dense(w, index, delta, axis).T + b)
    g = torch.randn(*shape_x, out_f, dtype=torch.float64)
    dense = torch.einsum("...o,...i->oi", g, x)
    want = dense[index] if axis == 0 else dense[:, index]
    torch.testing.assert_close(OPS.structured_grad(g, x, index, axis), want)


@pytest.mark.parametrize("axis", [0, 1])
def test_gradcheck_float64(axis):
    x, w, b, index, delta = _case((2, 3), 5, 7, 2, axis)
    args = (x.requires_grad_(), b.requires_grad_(), delta.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda x, b, d: OPS.structured_linear(x, w, b, index, d, axis), args)


def test_opcheck_and_joint_graph(backward_targets):
    x, w, b, index, delta = _case((2, 3), 5, 7, 2, 1, dtype=torch.float32)
    torch.library.opcheck(OPS.structured_linear.default,
                          (x.requires_grad_(), w, b, index, delta.requires_grad_(), 1))
    targets = backward_targets(lambda x, w, b, i, d: OPS.structured_linear(x, w, b, i, d, 1),
                               x, w, b, index, delta)
    assert "sparsec.structured_grad.default" in targets
    assert "sparsec.structured_grad_input.default" in targets


def test_bad_axis_is_refused():
    x, w, b, index, delta = _case((2,), 3, 4, 1, 0, dtype=torch.float32)
    with pytest.raises(ValueError, match="axis"):
        OPS.structured_linear(x, w, b, index, delta, 2)

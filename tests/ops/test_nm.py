import pytest
import torch

OPS = torch.ops.sparsec


def _mask_by_sort(w, n, m):
    # independent of topk: rank inside each group by a stable descending sort
    groups = w.abs().reshape(w.shape[0], -1, m)
    order = groups.argsort(dim=-1, descending=True, stable=True)
    ranks = order.argsort(dim=-1)
    return (ranks < n).reshape(w.shape)


@pytest.mark.parametrize("n,m,shape", [(2, 4, (5, 8)), (1, 4, (3, 12)), (4, 8, (7, 16)),
                                       (3, 3, (2, 9))])
def test_mask_has_exactly_n_per_group_and_matches_sort(n, m, shape):
    w = torch.randn(*shape, dtype=torch.float64)
    mask = OPS.nm_mask(w, n, m)
    assert (mask.reshape(shape[0], -1, m).sum(-1) == n).all()
    assert torch.equal(mask, _mask_by_sort(w, n, m))


def test_forward_is_linear_with_masked_weight():
    x, w, b = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64), \
        torch.randn(5, dtype=torch.float64)
    got = OPS.nm_linear(x, w, b, 2, 4, 0.0)
    torch.testing.assert_close(got, x @ (w * _mask_by_sort(w, 2, 4)).T + b)


def test_backward_is_straight_through_plus_sr_ste_decay():
    x = torch.randn(6, 8, dtype=torch.float64)
    w = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, 5, dtype=torch.float64)
    OPS.nm_linear(x, w, None, 2, 4, 0.3).backward(g)
    mask = _mask_by_sort(w.detach(), 2, 4)
    want = g.T @ x + 0.3 * w.detach() * (~mask)
    torch.testing.assert_close(w.grad, want)


def test_input_gradcheck_float64():
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, dtype=torch.float64,
                                                               requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: OPS.nm_linear(x, w, b, 2, 4, 1e-3), (x, b))


def test_opcheck_joint_graph_and_bad_shape(backward_targets):
    x, w = torch.randn(3, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    torch.library.opcheck(OPS.nm_linear.default, (x, w, None, 2, 4, 1e-4))
    targets = backward_targets(lambda x, w: OPS.nm_linear(x, w, None, 2, 4, 1e-4), x, w)
    for name in ("nm_mask", "nm_grad_input", "nm_grad_weight"):
        assert f"sparsec.{name}.default" in targets
    with pytest.raises(ValueError, match="divisible"):
        OPS.nm_linear(torch.randn(2, 6), torch.randn(3, 6), None, 2, 4, 0.0)


def test_ties_go_to_the_earlier_element():
    """|w| ties are decided by position (stable), so every device picks the same mask."""
    w = torch.tensor([[1.0, -1.0, 1.0, 0.5, 2.0, 2.0, -2.0, 2.0]])
    mask = OPS.nm_mask(w, 2, 4)
    assert mask.tolist() == [[True, True, False, False, True, True, False, False]]
    assert torch.equal(mask, _mask_by_sort(w, 2, 4))

"""The fine-tuning ops on CUDA (references until the Triton kernels land): same as on the CPU."""

import pytest
import torch

OPS = torch.ops.sparsec
pytestmark = pytest.mark.gpu


def _grads(fn, *tensors):
    out = fn(*tensors)
    out.square().sum().backward()
    return out.detach().cpu(), [t.grad.cpu() for t in tensors if t.requires_grad]


@pytest.mark.parametrize("case", ["delta", "structured", "nm"])
def test_cuda_matches_cpu(case):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 33, 96, generator=g)
    w = torch.randn(80, 96, generator=g) * 0.1
    if case == "delta":
        idx = torch.randperm(80 * 96, generator=g)[:300].sort().values
        v = torch.randn(300, generator=g)

        def fn(x, v, w=w, idx=idx):
            return OPS.sparse_delta_linear(x, w.to(x.device), None, idx.to(x.device), v)
        args = (x, v)
    elif case == "structured":
        idx = torch.tensor([3, 17, 40])
        d = torch.randn(80, 3, generator=g)

        def fn(x, d, w=w, idx=idx):
            return OPS.structured_linear(x, w.to(x.device), None, idx.to(x.device), d, 1)
        args = (x, d)
    else:
        def fn(x, w):
            return OPS.nm_linear(x, w, None, 2, 4, 1e-3)
        args = (x, w)
    cpu = _grads(fn, *[a.clone().requires_grad_() for a in args])
    gpu = _grads(fn, *[a.cuda().requires_grad_() for a in args])
    torch.testing.assert_close(gpu[0], cpu[0], rtol=1e-4, atol=1e-4)
    for a, b in zip(gpu[1], cpu[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)

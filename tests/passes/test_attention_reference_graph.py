"""The pass's stated reference, `dense_masked_attention`, against a float64 softmax oracle."""

import pytest
import torch

from sparsec.passes.attention_reference_graph import dense_masked_attention


def _oracle(q, k, v, allowed, bias, scale):
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale + bias.double()
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_any = allowed.any(-1, keepdim=True)
    out = torch.softmax(scores.masked_fill(~row_any, 0.0), -1) @ v.double()
    return out.masked_fill(~row_any, 0.0)


def _padded_case(device, dtype):
    """Keys 40.. are padding (bias finfo.min); query rows 48.. see only keys 40.., so all they
    see is padding, and query row 0 sees no key at all."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 32, generator=g) for _ in range(3))
    bias = torch.zeros(1, 1, 64, 64)
    bias[..., 40:] = torch.finfo(dtype).min
    allowed = torch.ones(1, 2, 64, 64, dtype=torch.bool)
    allowed[..., 48:, :40] = False
    allowed[..., 0, :] = False
    want = _oracle(q, k, v, allowed, bias, 0.2)
    got = dense_masked_attention(q.to(device, dtype), k.to(device, dtype), v.to(device, dtype),
                                 allowed.to(device), bias.to(device, dtype), 0.2)
    return got.double().cpu(), want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_that_see_only_masked_keys_average_them(dtype):
    got, want = _padded_case("cpu", dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert got[..., 48:, :].abs().sum() > 0 and not got[..., 0, :].any()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rows_that_see_only_masked_keys_average_them_on_cuda(dtype):
    """CUDA's fused SDPA kernels return 0 for such rows unless the mask is floored."""
    got, want = _padded_case("cuda", dtype)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)

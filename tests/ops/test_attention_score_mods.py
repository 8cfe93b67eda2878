"""Score modifications on the op: the tanh soft-cap and gradients to a float additive mask
(a bias), in float64 against plain torch autograd, through opcheck and in the joint graph."""

from __future__ import annotations

import pytest
import torch

from sparsec.layouts import BlockLayout
from sparsec.ops.block_sparse_attention import (
    attention_backward_op,
    attention_bias_backward_op,
    attention_op,
    block_sparse_attention,
)

f64 = torch.float64


def _inputs(B=2, H=4, Hkv=2, L=37, S=37, D=8, causal=True, bias_shape=(1, 4, 37, 37),
            seed=0, dtype=f64):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, L, D, generator=g, dtype=dtype) * 2).requires_grad_()
    k = (torch.randn(B, Hkv, S, D, generator=g, dtype=dtype) * 2).requires_grad_()
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=dtype).requires_grad_()
    keep = torch.rand(1, 1, -(-L // 16), -(-S // 16), generator=g) < 0.7
    keep[..., 0] = True
    lay = BlockLayout.from_dense_blocks(keep, L, S, 16, 16, causal)
    bias = torch.randn(*bias_shape, generator=g, dtype=dtype).requires_grad_()
    return q, k, v, lay, bias


def _eager(q, k, v, lay, bias, scale, softcap):
    """The same attention in plain torch (Gemma 2's order: scale, cap, then the mask)."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ kk.transpose(-1, -2)) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    s = s + bias
    s = s.masked_fill(~lay.to_element_mask(), float("-inf"))
    return torch.softmax(s, -1) @ vv


@pytest.mark.parametrize("softcap", [0.0, 2.5])
@pytest.mark.parametrize("bias_shape", [(1, 4, 37, 37), (2, 1, 37, 37), (37, 37)])
def test_gradients_reach_the_bias_and_match_torch(softcap, bias_shape):
    q, k, v, lay, bias = _inputs(bias_shape=bias_shape)
    out = block_sparse_attention(q, k, v, lay, attn_mask=bias, scale=0.3, softcap=softcap)
    want = _eager(q, k, v, lay, bias, 0.3, softcap)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    go = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, bias), go)
    ref = torch.autograd.grad(want, (q, k, v, bias), go)
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), got, ref):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)
    assert got[3].abs().sum() > 0


def test_softcap_changes_the_result_and_gradcheck_holds():
    q, k, v, lay, bias = _inputs(B=1, H=2, Hkv=1, L=20, S=20, D=4, bias_shape=(1, 2, 20, 20))
    plain = block_sparse_attention(q, k, v, lay, attn_mask=bias, scale=0.7)
    capped = block_sparse_attention(q, k, v, lay, attn_mask=bias, scale=0.7, softcap=1.0)
    assert (plain - capped).abs().max() > 1e-2

    def fn(q, k, v, bias):
        return block_sparse_attention(q, k, v, lay, attn_mask=bias, scale=0.7, softcap=1.0)
    assert torch.autograd.gradcheck(fn, (q, k, v, bias), fast_mode=True)


def test_no_bias_gradient_unless_asked():
    q, k, v, lay, bias = _inputs()
    bias = bias.detach()
    out = block_sparse_attention(q, k, v, lay, attn_mask=bias, scale=0.3, softcap=2.0)
    out.sum().backward()
    assert bias.grad is None and q.grad is not None
    with pytest.raises(ValueError, match="softcap"):
        block_sparse_attention(q, k, v, lay, softcap=-1.0)


def test_new_ops_pass_opcheck():
    q, k, v, lay, bias = _inputs(B=1, H=2, Hkv=1, L=20, S=20, D=4, bias_shape=(1, 2, 20, 20))
    args = (q, k, v, *lay.tensors(), bias, 0.3, True, 16, 16, 2.0)
    torch.library.opcheck(attention_op, args)
    out, lse = attention_op(*args)
    back = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse,
            *lay.tensors(), bias.detach(), 0.3, True, 16, 16, 2.0)
    torch.library.opcheck(attention_backward_op, back)
    torch.library.opcheck(attention_bias_backward_op, back)


def test_bias_backward_is_an_op_in_the_joint_graph():
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_function
    from torch._functorch.partitioners import default_partition

    q, k, v, lay, bias = _inputs()
    seen = []

    def compiler(gm, _):
        seen.extend(str(n.target) for n in gm.graph.nodes)
        return make_boxed_func(gm)

    fn = aot_function(lambda q, k, v, m, *t: attention_op(q, k, v, *t, m, 0.3, True, 16, 16,
                                                          2.0)[0],
                      fw_compiler=compiler, bw_compiler=compiler,
                      partition_fn=default_partition)
    out = fn(q, k, v, bias, *lay.tensors())
    got = torch.autograd.grad(out.sum(), (q, bias))
    want = torch.autograd.grad(_eager(q, k, v, lay, bias, 0.3, 2.0).sum(), (q, bias))
    assert "sparsec.block_sparse_attention_bias_backward.default" in seen
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.gpu
@pytest.mark.parametrize("eager", ["function", "op"])
def test_gpu_softcap_and_bias_grad_through_autograd(eager):
    """Real sizes in bfloat16 on CUDA, through both eager paths (the plain autograd.Function
    and the op's registered autograd); the second call replays stored launch plans."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from sparsec.kernels._triton import settings
    from sparsec.ops.attention_reference import block_sparse_attention_bias_backward_ref
    from sparsec.ops.attention_reference import block_sparse_attention_ref
    from sparsec.testing.kernels import TOL, rel_err

    L, H, Hkv, D = 2048, 8, 4, 128
    q, k, v, lay, bias = _inputs(B=2, H=H, Hkv=Hkv, L=L, S=L, D=D, bias_shape=(1, H, L, L),
                                 dtype=torch.float32)
    q, k, v, bias = (x.detach().cuda().to(torch.bfloat16).requires_grad_()
                     for x in (q, k, v, bias))
    lay = lay.to("cuda")
    d = [x.detach().double() for x in (q, k, v, bias)]
    args = (*lay.tensors(), d[3], D ** -0.5, True, 16, 16, 50.0)
    ref_out, ref_lse = block_sparse_attention_ref(*d[:3], *args)
    go = torch.randn(ref_out.shape, device="cuda").to(torch.bfloat16)
    refs = block_sparse_attention_bias_backward_ref(go.double(), *d[:3], ref_out, ref_lse,
                                                    *args)
    with settings(eager=eager):
        for _ in range(2):
            for x in (q, k, v, bias):
                x.grad = None
            out = block_sparse_attention(q, k, v, lay, attn_mask=bias, scale=D ** -0.5,
                                         softcap=50.0)
            out.backward(go)
            assert rel_err(out, ref_out) < TOL[torch.bfloat16]
            for name, x, want in zip(("dq", "dk", "dv", "dbias"), (q, k, v, bias), refs):
                assert rel_err(x.grad, want) < 2 * TOL[torch.bfloat16], name

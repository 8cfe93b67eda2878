"""Score modifications in the block-sparse attention kernels: a tanh soft-cap (Gemma 2) and
the gradient of an additive float mask (a bias, T5's relative positions), against the float64
reference. On the CPU under Triton's interpreter at small sizes; `pytest -m gpu` runs real
sizes in bfloat16. Outputs start as NaN (`poisoned`), so an element a kernel skips fails."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

triton = pytest.importorskip("triton")

from sparsec.kernels import block_sparse_attention as K  # noqa: E402
from sparsec.layouts import BlockLayout  # noqa: E402
from sparsec.ops.attention_reference import (  # noqa: E402
    block_sparse_attention_backward_ds,
    block_sparse_attention_ref,
)
from sparsec.testing.kernels import TOL, kernel_device, poisoned, rel_err  # noqa: E402

DEV = kernel_device()


def cfg(bm, bn, warps=4, stages=2):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def make(B, H, Hkv, L, S, D, bq, bk, causal, dtype, bias_shape, density, seed,
         device=DEV):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, L, D, generator=g) * 2).to(device, dtype)  # large scores: the cap bites
    k = (torch.randn(B, Hkv, S, D, generator=g) * 2).to(device, dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to(device, dtype)
    keep = torch.rand(1, 1, math.ceil(L / bq), math.ceil(S / bk), generator=g) < density
    keep[..., 0] = True  # every query block sees some key block
    lay = BlockLayout.from_dense_blocks(keep, L, S, bq, bk, causal).to(device)
    bias = None
    if bias_shape is not None:
        shape = [{"B": B, "H": H, "L": L, "S": S, "1": 1}[c] for c in bias_shape]
        bias = torch.randn(*shape, generator=g).to(device, dtype)
    return q, k, v, lay, bias


def check(q, k, v, lay, bias, causal, scale, softcap, fwd_cfg=None, bwd_cfgs=None,
          variants=("split", "atomic")):
    args = (*lay.tensors(), bias, scale, causal, lay.block_q, lay.block_kv, softcap)
    with poisoned():
        out, lse = K.block_sparse_attention(q, k, v, *args, config=fwd_cfg)
    d = [x.double() for x in (q, k, v)]
    d_args = (*lay.tensors(), None if bias is None else bias.double(), *args[5:])
    ref_out, ref_lse = block_sparse_attention_ref(*d, *d_args)
    tol = TOL[q.dtype]
    assert rel_err(out, ref_out) < tol
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(q.device, q.dtype)
    *refs, ref_ds = block_sparse_attention_backward_ds(go.double(), *d, ref_out, ref_lse,
                                                       *d_args)
    for variant in variants:
        with poisoned():
            grads = K.block_sparse_attention_backward(go, q, k, v, out, lse, *args,
                                                      configs=bwd_cfgs, variant=variant)
        assert len(grads) == 3
        for name, got, want in zip(("dq", "dk", "dv"), grads, refs):
            assert rel_err(got, want) < 2 * tol, (variant, name)
    if bias is not None:
        with poisoned():
            *grads, ds = K.block_sparse_attention_backward(go, q, k, v, out, lse, *args,
                                                           configs=bwd_cfgs, bias_grad=True)
        for name, got, want in zip(("dq", "dk", "dv", "dbias"), (*grads, ds), (*refs, ref_ds)):
            assert got.shape == want.shape and got.is_contiguous(), name
            assert rel_err(got, want) < 2 * tol, name
        dropped = ~lay.to_element_mask().expand_as(ref_ds)
        assert (ds[dropped] == 0).all()  # nothing outside the kept pairs


# id: B, Hq, Hkv, L, S, D, bq, bk, causal, dtype, bias dims, density, softcap, tiles
CPU_CASES = {
    "softcap-one-block": (1, 1, 1, 16, 16, 16, 16, 16, True, torch.float32, None, 1.0, 5.0,
                          None),
    "softcap-ragged-gqa-bf16": (2, 4, 2, 37, 37, 16, 16, 16, True, torch.bfloat16, None, 0.7,
                                2.0, None),
    "softcap-cross-subtiles": (1, 2, 1, 45, 33, 24, 32, 32, False, torch.float32, None, 0.7,
                               3.0, (cfg(16, 16), (cfg(16, 16), cfg(16, 16)))),
    "bias-heads-gqa": (2, 4, 2, 40, 40, 16, 16, 16, False, torch.float32, "1HLS", 0.6, 0.0,
                       None),
    "bias-batch-causal-ragged": (2, 2, 2, 37, 37, 16, 16, 16, True, torch.float32, "B1LS",
                                 0.8, 0.0, None),
    "bias-and-softcap-2d-fp16": (1, 2, 1, 48, 40, 16, 16, 32, False, torch.float16, "LS", 0.7,
                                 4.0, (cfg(16, 16), (cfg(16, 16), cfg(16, 16)))),
}


@pytest.mark.parametrize("name", CPU_CASES)
def test_score_mods_match_reference(name):
    *shape, softcap, tiles = CPU_CASES[name]
    q, k, v, lay, bias = make(*shape, seed=zlib.crc32(name.encode()))
    fwd_cfg, bwd_cfgs = tiles or (None, None)
    check(q, k, v, lay, bias, shape[8], 0.3, softcap, fwd_cfg, bwd_cfgs)


def test_bias_grad_refuses_bool_masks():
    q, k, v, lay, _ = make(1, 1, 1, 16, 16, 16, 16, 16, True, torch.float32, None, 1.0, 0)
    m = torch.ones(16, 16, dtype=torch.bool, device=DEV)
    out, lse = K.block_sparse_attention(q, k, v, *lay.tensors(), m, 0.3, True, 16, 16)
    with pytest.raises(ValueError, match="float attn_mask"):
        K.block_sparse_attention_backward(out, q, k, v, out, lse, *lay.tensors(), m, 0.3, True,
                                          16, 16, bias_grad=True)


GPU_CASES = {  # real sizes, bfloat16, head dim 128 (Gemma 2 uses 256: also covered)
    "gemma2-like-softcap": (2, 8, 4, 2048, 2048, 128, 64, 64, True, torch.bfloat16, None, 0.5,
                            50.0),
    "gemma2-head-256": (1, 4, 2, 1024, 1024, 256, 64, 64, True, torch.bfloat16, None, 0.6,
                        50.0),
    "t5-like-bias": (2, 8, 8, 2048, 2048, 64, 64, 64, False, torch.bfloat16, "1HLS", 0.4, 0.0),
    "bias-and-softcap-ragged": (1, 4, 2, 1500, 1500, 128, 64, 64, True, torch.bfloat16,
                                "B1LS", 0.5, 30.0),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", GPU_CASES)
@pytest.mark.parametrize("autotune", ["0", "1"])
def test_gpu_score_mods_match_reference(name, autotune, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setenv("SPARSEC_AUTOTUNE", autotune)
    *shape, softcap = GPU_CASES[name]
    q, k, v, lay, bias = make(*shape, seed=11, device="cuda")
    check(q, k, v, lay, bias, shape[8], 1 / math.sqrt(shape[5]), softcap)


_SM90 = """
import os, sys
sys.path.insert(0, "tools")
import torch
import host_overhead
host_overhead.install_fake_driver()
import sparsec
from sparsec.kernels import block_sparse_attention as fwd
from sparsec.kernels import block_sparse_attention_bwd as bwd
L, H, D = 256, 2, 64
lay = sparsec.layouts.sliding_window(L, window=128, sink=64, block=64)
q, k, v, do = (torch.randn(1, H, L, D, dtype=torch.bfloat16) for _ in range(4))
bias = torch.randn(1, H, L, L, dtype=torch.bfloat16)
for m, bias_grad, variants in ((None, False, ("split", "atomic")), (bias, True, ("split",))):
    a = (*lay.tensors(), m, D ** -0.5, True, 64, 64, 30.0)
    out, lse = fwd.block_sparse_attention(q, k, v, *a)
    for variant in variants:
        r = bwd.block_sparse_attention_backward(do, q, k, v, out, lse, *a, variant=variant,
                                                bias_grad=bias_grad)
        assert len(r) == (4 if bias_grad else 3)
print("compiled for sm_90")
"""


@pytest.mark.slow
def test_score_mod_kernels_compile_for_sm90():
    """The interpreter runs the kernels as Python; this compiles the SOFTCAP and BIAS_GRAD
    variants for sm_90 (a stand-in driver, tools/host_overhead.py), as a GPU would."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("Triton without its ptxas: cannot compile for sm_90")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(root) + os.pathsep + env.get("PYTHONPATH", ""),
               SPARSEC_AUTOTUNE="0", TRITON_DEFAULT_FP_FUSION="1")
    run = subprocess.run([sys.executable, "-c", _SM90], capture_output=True, text=True,
                         env=env, cwd=root, timeout=300)
    assert run.returncode == 0 and "compiled for sm_90" in run.stdout, run.stderr[-3000:]

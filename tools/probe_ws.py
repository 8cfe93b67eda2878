"""Probe: Triton's automatic warp specialization on Hopper for the attention forward.

    python tools/probe_ws.py --lengths 16384 4096 32768      # on an H100, Triton >= 3.6

`ws_forward_kernel` below is sparsec's forward (block_sparse_attention.py) cut down to what
the Tensor Memory Accelerator takes — q, k, v with unit stride along the head dim, no element
mask — reading its tiles through tensor descriptors made on the device, so that
`tl.range(..., warp_specialize=True)` can hand the loads to a producer warp group
(num_warps=4 compiles to 12 warps). Found offline (sm_90, Triton 3.6): only one loop per
kernel specializes (two loops fail in the compiler), a branch inside the loop silently turns
specialization off, and so the full and partial block lists are walked in one loop with an
arithmetic mask. Each tile runs with and without specialization ("ws" / "tma"), is checked
against sparsec's forward (out and lse), then timed (`triton.testing.do_bench`, median) next
to sparsec's autotuned forward and the compiled FlexAttention forward on the same block mask.

Kept as a probe, not a kernel: on the H100 with Triton 3.6 (2026-11-23,
docs/data/probe_ws_h100_triton36.json) every specialized tile of 128 query rows gave wrong
results and the 64-row one was 2x slower than sparsec's forward; rerun it on a newer Triton.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_attention import flex_block_mask, random_causal_layout  # noqa: E402

from sparsec.kernels import block_sparse_attention as F  # noqa: E402
from sparsec.kernels._attention_common import layout_args, query_tile  # noqa: E402
from sparsec.kernels._triton import tl, triton  # noqa: E402


@triton.jit
def ws_forward_kernel(Q, K, V, Out, Lse, Num, Idx, FNum, FIdx, qk_scale, L, S, H, G,
                      sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                      snb, snh, snm, sib, sih, sim, siw,
                      sfb, sfh, sfm, sjb, sjh, sjm, sjw,
                      D: tl.constexpr, DV: tl.constexpr, BLOCK_Q: tl.constexpr,
                      BLOCK_KV: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, WS: tl.constexpr):
    SUBS: tl.constexpr = BLOCK_KV // BLOCK_N
    bh, b, h, hk, m0, qb, offs_m = query_tile(H, G, BLOCK_M, BLOCK_Q)
    b64 = b.to(tl.int64)
    qd = tl.make_tensor_descriptor(Q + b64 * sqb + h.to(tl.int64) * sqh, shape=[L, D],
                                   strides=[sqm, 1], block_shape=[BLOCK_M, D])
    kd = tl.make_tensor_descriptor(K + b64 * skb + hk.to(tl.int64) * skh, shape=[S, D],
                                   strides=[skn, 1], block_shape=[BLOCK_N, D])
    vd = tl.make_tensor_descriptor(V + b64 * svb + hk.to(tl.int64) * svh, shape=[S, DV],
                                   strides=[svn, 1], block_shape=[BLOCK_N, DV])
    q = qd.load([m0, 0])
    acc = tl.zeros([BLOCK_M, DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    n_full = tl.load(FNum + b * sfb + h * sfh + qb * sfm) * SUBS
    n_all = n_full + tl.load(Num + b * snb + h * snh + qb * snm) * SUBS
    full_ptr = FIdx + b * sjb + h * sjh + qb * sjm
    part_ptr = Idx + b * sib + h * sih + qb * sim
    for it in tl.range(0, n_all, warp_specialize=WS):
        full = it < n_full
        j = tl.where(full, it, it - n_full)
        blk = tl.load(tl.where(full, full_ptr + (j // SUBS) * sjw, part_ptr + (j // SUBS) * siw))
        n0 = blk * BLOCK_KV + (j % SUBS) * BLOCK_N
        k = kd.load([n0, 0])
        s = tl.dot(q, k.T) * qk_scale
        offs_n = n0 + tl.arange(0, BLOCK_N)
        # the partial blocks' mask as arithmetic: a branch here turns specialization off
        ok = (offs_n[None, :] < S) | full
        if CAUSAL:
            ok = ok & ((offs_n[None, :] <= offs_m[:, None]) | full)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = vd.load([n0, 0])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    od = tl.make_tensor_descriptor(Out + b64 * sob + h.to(tl.int64) * soh, shape=[L, DV],
                                   strides=[som, 1], block_shape=[BLOCK_M, DV])
    od.store([m0, 0], out.to(Out.dtype.element_ty))
    tl.store(Lse + bh.to(tl.int64) * L + offs_m, lse, mask=offs_m < L)


TILES = ((128, 128, 4, 2), (128, 64, 4, 3), (128, 64, 4, 2), (64, 128, 4, 2))


def ws_forward(q, k, v, layout, scale, tile, ws=True):
    """(out, lse) of `ws_forward_kernel` with tile = (BLOCK_M, BLOCK_N, warps, stages)."""
    B, H, L, D = q.shape
    S, DV = k.shape[2], v.shape[-1]
    num, idx, fnum, fidx = layout.tensors()
    num, idx, pstr = layout_args(num, idx, B, H)
    fnum, fidx, fstr = layout_args(fnum, fidx, B, H)
    out = torch.empty(B, H, L, DV, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    bm, bn, warps, stages = tile
    ws_forward_kernel[(triton.cdiv(L, bm), B * H)](
        q, k, v, out, lse, num, idx, fnum, fidx, scale * 1.4426950408889634, L, S, H,
        H // k.shape[1], *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        *pstr, *fstr, D=D, DV=DV, BLOCK_Q=layout.block_q, BLOCK_KV=layout.block_kv,
        CAUSAL=layout.causal, BLOCK_M=bm, BLOCK_N=bn, WS=ws, num_warps=warps,
        num_stages=stages)
    return out, lse


def rel(a, b):
    a, b = a.double(), b.double()
    ok = torch.isfinite(b)
    return float((a[ok] - b[ok]).norm() / b[ok].norm().clamp_min(1e-30))


def main(argv=None) -> int:
    import triton.testing
    from torch.nn.attention.flex_attention import flex_attention

    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "probe_ws.json"))
    args = ap.parse_args(argv)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8,
                                                                 device="cuda"))
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    for L in args.lengths:
        dens = 0.16 if L <= 4096 else 0.11
        layout = random_causal_layout(L, args.heads, dens, L).to("cuda")
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, args.heads, L, 128, device="cuda", dtype=torch.bfloat16,
                               generator=g) for _ in range(3))
        scale = 1 / math.sqrt(128)
        lay = layout.tensors()
        ref_out, ref_lse = F.block_sparse_attention(q, k, v, *lay, None, scale, True, 128, 128)
        bm = flex_block_mask(layout, L, args.heads)
        row = {"L": L, "density": dens}
        row["sparsec_fwd"] = triton.testing.do_bench(
            lambda: F.block_sparse_attention(q, k, v, *lay, None, scale, True, 128, 128),
            return_mode="median")
        row["flex_fwd"] = triton.testing.do_bench(lambda: flex(q, k, v, block_mask=bm),
                                                  return_mode="median")
        flex_out = flex(q, k, v, block_mask=bm)
        row["sparsec_vs_flex_err"] = rel(ref_out, flex_out)
        for tile in TILES:
            for ws in (True, False):
                name = f"{'ws' if ws else 'tma'} {tile}"
                try:
                    out, lse = ws_forward(q, k, v, layout, scale, tile, ws)
                    torch.cuda.synchronize()
                except Exception as e:  # noqa: BLE001 - a tile that fails is a result
                    print(f"L={L} {name}: FAILED {type(e).__name__}: {str(e)[:120]}", flush=True)
                    continue
                err_o, err_l = rel(out, ref_out), rel(lse, ref_lse)
                if not (err_o < 1e-2 and err_l < 1e-3):
                    print(f"L={L} {name}: WRONG out {err_o:.3g} lse {err_l:.3g}", flush=True)
                    row[name] = {"wrong": [err_o, err_l]}
                    continue
                ms = triton.testing.do_bench(lambda: ws_forward(q, k, v, layout, scale, tile, ws),
                                             return_mode="median")
                row[name] = {"ms": ms, "err_out": err_o, "err_lse": err_l}
                print(f"L={L} {name}: {ms:.3f} ms (sparsec {row['sparsec_fwd']:.3f}, flex "
                      f"{row['flex_fwd']:.3f}) err {err_o:.2g}/{err_l:.2g}", flush=True)
        rows.append(row)
    Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                           "torch": torch.__version__,
                                           "triton": triton.__version__, "rows": rows},
                                          indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

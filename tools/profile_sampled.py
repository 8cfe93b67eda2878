"""Where the sampled weight gradient's time goes: device time vs the host's, per kernel.

    python tools/profile_sampled.py                 # 4096 x 4096 weight, 8192 tokens, bf16

For each density, the sampled path as it runs ("sampled": the form picked by the entries per
row) and as v3 ran it ("v3": the block form always), each checked against dense first: the
median of `triton.testing.do_bench` on a plain call (what bench_sparse_delta.py times: host
launches included where they are slower than the GPU), the same call replayed from a CUDA
graph (no host work: the device time alone), and the torch profiler's device time per kernel
for one call. The same for dense dW + gather. If the plain call is much slower than its graph
replay, the host sets the pace.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsec.kernels import sparse_delta as K  # noqa: E402


def graph_ms(fn) -> float:
    import triton.testing

    fn()  # compile and warm up outside the capture
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return float(triton.testing.do_bench(g.replay, warmup=25, rep=100, return_mode="median"))


def kernels_us(fn) -> dict:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t and e.key and not e.key.startswith(("cudaDeviceSynchronize", "Activity")):
            out[e.key[:40]] = t / 10
    return out


def main(argv=None) -> None:
    import triton.testing

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--densities", type=float, nargs="+", default=[1e-4, 1e-3, 3e-3, 1e-2])
    args = ap.parse_args(argv)
    out_f = in_f = 4096
    T = 8192
    g = torch.Generator(device="cuda").manual_seed(0)
    grad = torch.randn(T, out_f, device="cuda", generator=g).bfloat16()
    x = torch.randn(T, in_f, device="cuda", generator=g).bfloat16()
    print(f"{torch.cuda.get_device_name()}: weight {out_f}x{in_f}, {T} tokens, bf16; ms")
    print(f"{'density':>8} {'path':>8} {'plain':>8} {'graph':>8}  kernels (µs per call)")
    for d in args.densities:
        k = max(1, int(round(d * out_f * in_f)))
        idx = torch.randperm(out_f * in_f, device="cuda", generator=g)[:k].sort().values
        paths = {"sampled": lambda: K.sampled_grad_sampled(grad, x, idx, in_f),
                 "v3": lambda: K.sampled_grad_sampled(grad, x, idx, in_f, form="block"),
                 "dense": lambda: K.sampled_grad_dense(grad, x, idx, in_f)}
        want = paths["dense"]().float()
        for name in ("sampled", "v3"):
            err = float((paths[name]().float() - want).norm() / want.norm())
            if not err < 1e-2:
                raise SystemExit(f"{name} at {d:.2%}: relative error {err:.3g} against dense")
        for name, fn in paths.items():
            plain = float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
            replay = graph_ms(fn)
            ks = ", ".join(f"{n} {t:.1f}" for n, t in sorted(kernels_us(fn).items(),
                                                             key=lambda kv: -kv[1])[:4])
            print(f"{d:8.2%} {name:>8} {plain:8.3f} {replay:8.3f}  {ks}", flush=True)

    sweep(grad, x, in_f, g)


def sweep(grad, x, in_f, g, density: float = 1e-3) -> None:
    """The block form's tiles at one density: tokens per tile, warps, token ranges, pipeline
    stages."""
    import triton.testing

    out_f = grad.shape[1]
    k = int(round(density * out_f * in_f))
    idx = torch.randperm(out_f * in_f, device="cuda", generator=g)[:k].sort().values
    chunks = K.cdiv(k, 64)
    print(f"block form at {density:.2%}, {chunks} chunks; ms (plain call)")

    def ms(**kw) -> str:
        def fn():
            return K.sampled_grad_sampled(grad, x, idx, in_f, form="block", **kw)
        return f"{triton.testing.do_bench(fn, warmup=10, rep=40, return_mode='median'):.3f}"
    for tokens in (16, 32):
        for warps in (1, 2, 4):
            row = [f"entries={e} {ms(tokens=tokens, warps=warps, entries=e)} / splits=8 "
                   f"{ms(tokens=tokens, warps=warps, entries=e, splits=8)}"
                   for e in (32, 64, 128)]
            print(f"  tokens={tokens:3d} warps={warps}: " + ", ".join(row), flush=True)
    print("  tokens=32 warps=2 entries=64, stages 1-5: "
          + ", ".join(ms(tokens=32, warps=2, pipeline=st) for st in (1, 2, 3, 4, 5)))

if __name__ == "__main__":
    main()

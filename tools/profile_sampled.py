"""Where the sampled weight gradient's time goes: device time vs the host's, per kernel.

    python tools/profile_sampled.py                 # 4096 x 4096 weight, 8192 tokens, bf16

For each density, the sampled path as it runs ("sampled": the form picked by the entries per
row) and in the other form ("other"), each checked against dense first: the
median of `triton.testing.do_bench` on a plain call (what bench_sparse_delta.py times: host
launches included where they are slower than the GPU), the same call replayed from a CUDA
graph (no host work: the device time alone), and the torch profiler's device time per kernel
for one call. The same for dense dW + gather. If the plain call is much slower than its graph
replay, the host sets the pace.

With --ncu: one warm call of the sampled path per density between cudaProfilerStart and Stop
and nothing else (run under `ncu --profile-from-start off`).
"""

from __future__ import annotations

import argparse
import json
import os
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


def capture(fn) -> None:
    """Warm up, then one call inside the profiler's capture range."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


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
    ap.add_argument("--ncu", action="store_true",
                    help="only one warm call per density under cudaProfilerStart/Stop")
    ap.add_argument("--transpose", action="store_true",
                    help="time the transpose of x with every tile candidate, and torch's")
    ap.add_argument("--quick", action="store_true",
                    help="sweep only the token ranges (splits) and the xᵀ orders of each form")
    ap.add_argument("--sweep", type=float, nargs="*", default=[1e-3],
                    help="densities at which to time every tile variant")
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
        if args.ncu:
            capture(lambda: K.sampled_grad_sampled(grad, x, idx, in_f))
            continue
        paths = {"sampled": lambda: K.sampled_grad_sampled(grad, x, idx, in_f),
                 "other": lambda: K.sampled_grad_sampled(grad, x, idx, in_f, form=(
                     "block" if K.choose_form() == "window" else "window")),
                 "dense": lambda: K.sampled_grad_dense(grad, x, idx, in_f)}
        want = paths["dense"]().float()
        for name in ("sampled", "other"):
            err = float((paths[name]().float() - want).norm() / want.norm())
            if not err < 1e-2:
                raise SystemExit(f"{name} at {d:.2%}: relative error {err:.3g} against dense")
        for name, fn in paths.items():
            plain = float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
            replay = graph_ms(fn)
            ks = ", ".join(f"{n} {t:.1f}" for n, t in sorted(kernels_us(fn).items(),
                                                             key=lambda kv: -kv[1])[:4])
            print(f"{d:8.2%} {name:>8} {plain:8.3f} {replay:8.3f}  {ks}", flush=True)

    if args.ncu:
        return
    results: dict = {}
    if args.transpose:
        results["transpose"] = transpose_sweep(x)
    for d in args.sweep:
        sweep(grad, x, in_f, g, d, results, args.quick)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "sampled_sweep.json").write_text(json.dumps(results, indent=1))


TRANSPOSE_TILES = ((64, 64, 4), (64, 64, 8), (128, 64, 4), (128, 64, 8), (64, 128, 4),
                   (64, 128, 8), (128, 128, 8), (128, 128, 16), (32, 128, 4), (256, 64, 8),
                   (32, 256, 8))


def transpose_sweep(x) -> dict:
    """ms of xᵀ with each (rows, columns, warps) tile of the Triton kernel, checked against
    torch, and of torch's own copy; printed with the bandwidth (bytes read + written)."""
    import triton.testing

    want = x.t().contiguous()
    fns = {"torch": lambda: x.t().contiguous()}
    for tile in TRANSPOSE_TILES:
        if not torch.equal(K.transpose(x, tile), want):
            raise SystemExit(f"transpose tile {tile}: wrong result")
        fns[str(tile)] = lambda tile=tile: K.transpose(x, tile)
    out = {}
    for name, fn in fns.items():
        out[name] = float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
        print(f"  transpose {name:16s} {out[name]:.4f} ms "
              f"{2 * x.numel() * x.element_size() / out[name] / 1e9:.2f} TB/s", flush=True)
    return out


def variants(density: float, quick: bool = False) -> dict:
    """Tile choices to time at one density: both forms, tokens per tile, warps, pipeline
    stages, entries per chunk and window rows. (Round 5 also tried token tiles of 128 and a
    window's chunks shared among 2–3 programs: no gain at 0.1%; its data is in
    docs/data/sampled_sweep_h100_v5_round5.json.)"""
    out = {}
    for tokens in () if quick else (32, 64):
        for warps in (4, 8):
            for stages in (3, 4):
                base = dict(tokens=tokens, warps=warps, pipeline=stages)
                for e in (64, 128):
                    out[f"block e={e} t={tokens} w={warps} s={stages}"] = \
                        dict(base, form="block", entries=e)
                for e, rw in ((64, 16), (128, 16), (128, 32), (256, 32)):
                    out[f"window e={e} rw={rw} t={tokens} w={warps} s={stages}"] = \
                        dict(base, form="window", entries=e, window=rw)
    for form in ("block", "window"):  # token ranges around token_splits' choice
        for n in (1, 2, 4, 6, 8):
            out[f"{form} defaults splits={n}"] = dict(form=form, splits=n)
        for order in K.ORDERS:  # the order xᵀ is written and read in (L2 reuse)
            out[f"{form} order={order}"] = dict(form=form, order=order)
    return out


def sweep(grad, x, in_f, g, density: float, results: dict, quick: bool = False) -> None:
    """Every variant of `variants` at one density, checked against dense first; plain-call
    and CUDA-graph medians in ms, best five printed."""
    import triton.testing

    out_f = grad.shape[1]
    k = int(round(density * out_f * in_f))
    idx = torch.randperm(out_f * in_f, device="cuda", generator=g)[:k].sort().values
    want = K.sampled_grad_dense(grad, x, idx, in_f).float()
    rows = {}
    for name, kw in variants(density, quick).items():
        def fn(kw=kw):
            return K.sampled_grad_sampled(grad, x, idx, in_f, **kw)
        try:
            err = float((fn().float() - want).norm() / want.norm())
        except Exception as e:  # noqa: BLE001 - a config that does not compile is a result
            print(f"  {name}: FAILED {type(e).__name__}: {str(e)[:80]}", flush=True)
            continue
        if not err < 1e-2:
            raise SystemExit(f"{name} at {density:.2%}: relative error {err:.3g}")
        plain = float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
        rows[name] = {"plain": plain, "graph": graph_ms(fn)}
    results[f"{density:g}"] = rows
    best = sorted(rows.items(), key=lambda kv: kv[1]["graph"])
    print(f"sweep at {density:.2%} ({len(rows)} variants), best by device time (graph ms, "
          f"plain ms):", flush=True)
    for name, t in best[:6]:
        print(f"  {name:36s} {t['graph']:.3f} {t['plain']:.3f}")
    for form in ("block", "window"):
        mine = [kv for kv in best if kv[0].startswith(form)]
        if mine:
            print(f"  best {form}: {mine[0][0]} {mine[0][1]['graph']:.3f}")


if __name__ == "__main__":
    main()

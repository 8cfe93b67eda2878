"""Where sparsec's block-sparse attention spends its time on a GPU: the torch profiler's CUDA
kernels and host-side ops for forward and forward+backward, at one length and density.

    python tools/profile_attention.py --length 4096 --density 0.16 --variant v2
    python tools/profile_attention.py --length 16384 --density 0.11 --flex   # and Flex's

Prints the top kernels by CUDA time and the wall time per call (host included), so per-call
overheads (layout transposes, copies, autotuning, launches) show beside the attention kernels.
With --flex the same for FlexAttention (compiled) on the same block mask: kernel by kernel.
With --ncu each run makes one warm forward+backward call between cudaProfilerStart and Stop
and nothing else, for Nsight Compute:

    ncu --profile-from-start off --clock-control none --section SpeedOfLight \
        python tools/profile_attention.py --length 16384 --density 0.11 --flex --ncu
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sparsec  # noqa: E402
from sparsec.kernels._triton import settings  # noqa: E402
from tools.bench_attention import VARIANTS, flex_block_mask, random_causal_layout  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--density", type=float, default=0.16)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--variant", default="v2", choices=list(VARIANTS))
    ap.add_argument("--flex", action="store_true", help="profile FlexAttention too")
    ap.add_argument("--ncu", action="store_true",
                    help="one warm forward+backward per run under cudaProfilerStart/Stop")
    args = ap.parse_args(argv)
    with settings(**VARIANTS[args.variant]):
        return _profile(args)


def _profile(args) -> int:
    layout = random_causal_layout(args.length, args.heads, args.density, seed=0).to("cuda")
    q, k, v, do = (torch.randn(1, args.heads, args.length, args.dim, device="cuda",
                               dtype=torch.bfloat16) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()

    def fwd():
        return sparsec.block_sparse_attention(q, k, v, layout)

    runs = [(args.variant, fwd)]
    if args.flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        bm = flex_block_mask(layout, args.length, args.heads)
        runs.append(("flex", lambda: flex(q, k, v, block_mask=bm)))
    for label, f in runs:
        (_capture if args.ncu else _time)(label, f, do, q, k, v, layout, args)
    return 0


def _capture(label, fwd, do, q, k, v, layout, args) -> None:
    """Warm up, then one forward+backward inside the profiler's capture range."""
    for _ in range(3):
        fwd().backward(do)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    fwd().backward(do)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"captured one forward+backward of {label}", flush=True)


def _time(label, fwd, do, q, k, v, layout, args) -> None:
    def fwdbwd():
        fwd().backward(do)
        for t in (q, k, v):  # as the benchmark: no gradient accumulation kernels
            t.grad = None

    for name, fn in (("forward", fwd), ("forward+backward", fwdbwd)):
        for _ in range(5):  # warm-up: autotuning, compiles, caches
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.iters):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / args.iters * 1e3
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.iters):
                fn()
            torch.cuda.synchronize()
        print(f"\n== {name} ({label}): L={args.length}, density "
              f"{layout.density():.3f}, wall {wall:.3f} ms per call (host included)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12,
                                        max_name_column_width=60))


if __name__ == "__main__":
    raise SystemExit(main())

"""A/B of the attention kernels' tiles: the forward, or the whole split backward (dQ kernel,
then dK/dV) with each candidate tile of one kernel pinned (the other kernel's tile fixed),
timed interleaved in one process, so clock and neighbour noise hit every candidate alike
(two autotuned runs of the same code differ by up to 4% on the lent H100s).

    python tools/ab_attention_tiles.py --length 16384 --density 0.11 --reps 30
    python tools/ab_attention_tiles.py --kernel dq --other 64 64 4 2
    python tools/ab_attention_tiles.py --kernel fwd --layout window

Each candidate is checked against the first one (dq, dk, dv; or out, lse) before timing. Per
run: L2 flushed (a 256 MB write), then CUDA events around one call; the median and the
fastest run per candidate are printed, with the ratio of medians to the first candidate's.
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

from bench_attention import random_causal_layout  # noqa: E402

from sparsec.kernels import block_sparse_attention as F  # noqa: E402
from sparsec.kernels import block_sparse_attention_bwd as B  # noqa: E402
from sparsec.layouts import sliding_window  # noqa: E402

CANDIDATES = {  # (BLOCK_M, BLOCK_N, warps, stages)
    "dkdv": ((64, 128, 8, 3), (64, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 3), (32, 64, 4, 2),
             (64, 64, 8, 3), (32, 128, 8, 3)),
    "dq": ((64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 3),
           (128, 64, 8, 2), (64, 128, 4, 2)),
    "fwd": ((128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3), (64, 64, 4, 2),
            (64, 128, 4, 2), (64, 32, 4, 4)),
}


def cfg(t):
    import triton
    return triton.Config({"BLOCK_M": t[0], "BLOCK_N": t[1]}, num_warps=t[2], num_stages=t[3])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--density", type=float, default=0.11)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--layout", choices=("random", "window"), default="random",
                    help="random causal blocks at --density, or a window of L/16 + a 128 sink")
    ap.add_argument("--kernel", choices=list(CANDIDATES), default="dkdv")
    ap.add_argument("--other", type=int, nargs=4, default=None,
                    help="the other kernel's tile (default: dQ (64, 64, 4, 3), dK/dV (64, 64, 4, "
                         "2))")
    args = ap.parse_args(argv)
    tiles = CANDIDATES[args.kernel]
    other = tuple(args.other or ((64, 64, 4, 3) if args.kernel == "dkdv" else (64, 64, 4, 2)))
    L, H = args.length, args.heads
    layout = (random_causal_layout(L, H, args.density, L) if args.layout == "random" else
              sliding_window(L, window=L // 16, sink=128, block=128)).to("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(1, H, L, 128, device="cuda", dtype=torch.bfloat16, generator=g)
                   for _ in range(4))
    lay = layout.tensors()
    scale = 1 / math.sqrt(128)
    out, lse = F.block_sparse_attention(q, k, v, *lay, None, scale, True, 128, 128)

    def call(t):
        if args.kernel == "fwd":
            return F.block_sparse_attention(q, k, v, *lay, None, scale, True, 128, 128,
                                            config=cfg(t))
        pair = (t, other) if args.kernel == "dkdv" else (other, t)
        return B.block_sparse_attention_backward(do, q, k, v, out, lse, *lay, None, scale,
                                                 True, 128, 128, configs=tuple(map(cfg, pair)),
                                                 variant="split")
    want = call(tiles[0])
    for t in tiles[1:]:
        got = call(t)
        for name, a, b in zip(("dq", "dk", "dv") if args.kernel != "fwd" else ("out", "lse"),
                              got, want):
            err = float((a.float() - b.float()).norm() / b.float().norm())
            if not err < 1e-2:
                raise SystemExit(f"{t}: {name} differs from {tiles[0]} by {err:.3g}")
    flush = torch.empty(64 << 20, dtype=torch.int32, device="cuda")
    times = {t: [] for t in tiles}
    for _ in range(args.reps):
        for t in tiles:
            flush.zero_()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            call(t)
            e.record()
            e.synchronize()
            times[t].append(s.elapsed_time(e))
    base = sorted(times[tiles[0]])[args.reps // 2]
    rows = {}
    what = f"{args.density:.0%} random causal" if args.layout == "random" else \
        f"window {L // 16} + sink 128"
    other_txt = f", the other kernel's {other}" if args.kernel != "fwd" else ""
    print(f"{torch.cuda.get_device_name()}: {args.kernel} tiles at L={L}, {what}{other_txt}; "
          f"ms over {args.reps} interleaved runs")
    for t, ts in times.items():
        ts = sorted(ts)
        rows[str(t)] = {"median": ts[len(ts) // 2], "min": ts[0]}
        print(f"  {args.kernel} {str(t):18s} median {ts[len(ts) // 2]:.3f}  min {ts[0]:.3f}  "
              f"x{ts[len(ts) // 2] / base:.3f}")
    if os.environ.get("OUT"):
        name = f"ab_{args.kernel}_tiles_{args.layout}_{L}.json"
        Path(os.environ["OUT"], name).write_text(json.dumps(
            {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
             "layout": args.layout, "other": other, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

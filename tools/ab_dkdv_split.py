"""A/B of the attention backward with heavy key tiles split over several dK/dV programs
(`split_chunk`, the default) against one program per key tile, timed interleaved in one
process on the layouts of the whole-model benchmark: a sliding window (2048) with a 128-token
sink, and the causal grid, for the benchmark model's heads (16 query, 4 key/value, dim 128).

    python tools/ab_dkdv_split.py --lengths 16384,32768 --reps 20 --json out.json

Both runs are checked against each other (dq, dk, dv, bf16) before timing. Per run: L2
flushed (a 256 MB write), then CUDA events around one backward call; medians are printed with
the ratio unsplit / split (> 1: splitting is faster).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsec.kernels import block_sparse_attention as F  # noqa: E402
from sparsec.kernels import block_sparse_attention_bwd as B  # noqa: E402
from sparsec.layouts import dense, sliding_window  # noqa: E402


def layouts(length: int, window: int, sink: int) -> dict:
    return {f"window {window} + sink {sink}": sliding_window(length, window=window, sink=sink,
                                                             block=128),
            "causal": dense(length, block=128)}


def timed(fn, reps: int, flush: torch.Tensor) -> list[float]:
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def one(length, name, layout, args, flush) -> dict:
    H, HKV, D = args.heads, args.kv_heads, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, do = (torch.randn(1, H, length, D, device="cuda", dtype=torch.bfloat16, generator=g)
             for _ in range(2))
    k, v = (torch.randn(1, HKV, length, D, device="cuda", dtype=torch.bfloat16, generator=g)
            for _ in range(2))
    lay = layout.to("cuda").tensors()
    scale = 1 / math.sqrt(D)
    out, lse = F.block_sparse_attention(q, k, v, *lay, None, scale, True, 128, 128)
    nq = math.ceil(length / 128)
    whole = (H // HKV) * nq  # one chunk holds every pair of a key tile: no split

    def call(chunk):
        return B.block_sparse_attention_backward(do, q, k, v, out, lse, *lay, None, scale,
                                                 True, 128, 128, variant="split", chunk=chunk)
    split, unsplit = call(None), call(whole)
    diff = max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)
                ).item() for a, b in zip(split, unsplit))
    runs = {"split": [], "unsplit": []}
    for _ in range(args.reps):  # interleaved
        runs["split"] += timed(lambda: call(None), 1, flush)
        runs["unsplit"] += timed(lambda: call(whole), 1, flush)
    med = {k: sorted(t)[len(t) // 2] for k, t in runs.items()}
    row = {"length": length, "layout": name, "chunk": B.split_chunk(H // HKV, nq),
           "split_ms": med["split"], "unsplit_ms": med["unsplit"],
           "speedup": med["unsplit"] / med["split"], "max_rel_diff": diff}
    print(f"{length:>6} {name:<26} chunk {row['chunk']}  split {med['split']:.3f} ms  "
          f"unsplit {med['unsplit']:.3f} ms  ×{row['speedup']:.2f}  max rel diff {diff:.1e}",
          flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="16384,32768")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--sink", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("ab_dkdv_split: needs a CUDA GPU", file=sys.stderr)
        return 2
    flush = torch.empty(64 * 2**20, dtype=torch.float32, device="cuda")
    rows = [one(n, name, lay, args, flush) for n in map(int, args.lengths.split(","))
            for name, lay in layouts(n, args.window, args.sink).items()]
    if args.json:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "triton": __import__("triton").__version__}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    bad = [r for r in rows if not r["max_rel_diff"] < 2e-2]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Where the host's time goes in one block-sparse attention forward+backward call (cProfile,
self time), on a GPU, at a short length where the host sets the pace.

    python tools/profile_host.py --length 4096
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_attention import random_causal_layout  # noqa: E402

import sparsec  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args(argv)
    L, H = args.length, args.heads
    lay = random_causal_layout(L, H, 0.16, 0).to("cuda")
    q, k, v, do = (torch.randn(1, H, L, 128, device="cuda", dtype=torch.bfloat16)
                   for _ in range(4))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))

    def fwdbwd():
        sparsec.block_sparse_attention(qg, kg, vg, lay).backward(do)
        qg.grad = kg.grad = vg.grad = None
    for _ in range(20):
        fwdbwd()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.calls):
        fwdbwd()
    host = (time.perf_counter() - t0) / args.calls
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / args.calls
    print(f"{torch.cuda.get_device_name()}: L={L}; host µs per call (no sync) {host * 1e6:.0f}, "
          f"wall µs per call {wall * 1e6:.0f}")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.calls):
        fwdbwd()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())

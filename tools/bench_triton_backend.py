"""The triton backend end to end on a GPU: a Llama-style model with block-sparse attention,
dense parts eager vs through torch.compile, against the dense model.

    python tools/bench_triton_backend.py            # dim 1024, 4 layers, 4096 tokens, bf16

Builds examples/tiny_llama.py scaled up on CUDA, rewrites its attention to a sliding window
(+ sink) layout of 128-blocks, lowers with `--backend triton` twice (dense parts eager, then
`compile=True`), checks both against each other and reports forward times (median of
`triton.testing.do_bench`) next to the dense model run eager. Prints one table; with $OUT set
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sparsec  # noqa: E402
from sparsec.passes.attention import BlockSparseAttention  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--window", type=int, default=1024)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_triton_backend: needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton.testing

    tl = sparsec.load_model_file(ROOT / "examples" / "tiny_llama.py").module
    cfg = tl.Config(dim=args.dim, layers=args.layers, heads=args.dim // 64,
                    kv_heads=args.dim // 256, ffn=int(2.75 * args.dim) // 64 * 64,
                    max_len=args.length)
    model = tl.init_weights(tl.Llama(cfg)).to("cuda", torch.bfloat16).eval()
    tokens = torch.randint(0, cfg.vocab, (args.batch, args.length), device="cuda")
    program = sparsec.trace(model, (tokens,))
    layout = BlockSparseAttention(layout="sliding-window", window=args.window, sink=128,
                                  block=128)
    rows, outs = {}, {}
    with torch.no_grad():
        rows["dense model, eager"] = triton.testing.do_bench(lambda: model(tokens),
                                                             return_mode="median")
    for name, options in (("sparsec triton, dense eager", {}),
                          ("sparsec triton, dense torch.compile", {"compile": True})):
        t0 = time.time()
        compiled = sparsec.compile(program, passes=[layout], backend="triton",
                                   backend_options=options)
        with torch.no_grad():
            outs[name] = compiled(tokens)
            rows[name] = triton.testing.do_bench(lambda: compiled(tokens),
                                                 return_mode="median")
        print(f"{name}: lowered and timed in {time.time() - t0:.1f}s; kernels "
              f"{compiled.report['triton']['kernels']}, parity "
              f"{compiled.report['triton'].get('parity')}", flush=True)
    a, b = outs.values()
    diff = float((a.float() - b.float()).norm() / b.float().norm())
    result = {"device": torch.cuda.get_device_name(), "config": vars(args), "ms": rows,
              "compile_vs_eager_rel_diff": diff}
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_triton_backend.json").write_text(json.dumps(result,
                                                                                    indent=1))
    print(f"\n{result['device']}: Llama dim {args.dim}, {args.layers} layers, batch "
          f"{args.batch} x {args.length} tokens, bf16, window {args.window} + sink 128; "
          f"forward, median ms")
    for name, ms in rows.items():
        print(f"  {name:38} {ms:8.3f}")
    print(f"  eager vs torch.compile outputs: relative difference {diff:.2e}")
    return 0 if diff < 2e-2 else 1


if __name__ == "__main__":
    sys.exit(main())

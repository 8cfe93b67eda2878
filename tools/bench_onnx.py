"""onnxruntime CPU time of block-sparse attention exported by sparsec vs the dense export.

    python tools/bench_onnx.py                      # lengths 1024 2048 4096, the default layouts
    python tools/bench_onnx.py --lengths 4096 --runs 9 --json out.json

Two parts, in one run, every session with 2 intra-op threads, sequential execution:

1. attention alone (batch 1, 8 heads, head dim 64, causal, blocks of 64): torch's ONNX export of
   `scaled_dot_product_attention(is_causal=True)` (the dense export) vs sparsec's gathered
   export of `sparsec::block_sparse_attention` under sliding-window + sink layouts of several
   densities (and sparsec's dense masked fallback at the first length);
2. whole models: examples/tiny_llama.py at max_len 4096 exported without passes (dense) and
   with block-sparse-attention (sliding window), through `sparsec.compile(..., backend="onnx")`.

Parity is checked before timing (onnxruntime vs PyTorch). Times are medians of `--runs` runs
after `--warmup` runs. "ideal" is the causal block grid over the kept blocks (the issue's
dense blocks / kept blocks); "work" is what the dense export really computes, the full
L × L grid, over the gathered slots (kept blocks plus padding slots). Writes a JSON file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sparsec  # noqa: E402
from sparsec.layouts import sliding_window  # noqa: E402
from sparsec.ops.onnx_common import ExportContext, export_context  # noqa: E402

HEADS, HEAD_DIM, BLOCK = 8, 64, 64
LAYOUTS = ((256, 64), (512, 64), (1024, 64))  # (window, sink) in tokens


def session(path_or_bytes, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path_or_bytes, so, providers=["CPUExecutionProvider"])


def timed(sess, feed, warmup: int, runs: int) -> dict:
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3,
            "max_ms": max(times) * 1e3, "runs": runs}


class Dense(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


class Sparse(torch.nn.Module):
    def __init__(self, layout):
        super().__init__()
        self.layout = layout
        for name, t in zip(("num", "idx", "fnum", "fidx"), layout.tensors()):
            self.register_buffer(name, t)

    def forward(self, q, k, v):
        return torch.ops.sparsec.block_sparse_attention(
            q, k, v, self.num, self.idx, self.fnum, self.fidx, None, HEAD_DIM ** -0.5, True,
            BLOCK, BLOCK)[0]


def export_bytes(module, inputs, form: str = "gathered") -> bytes:
    with export_context(ExportContext(attention=form)), sparsec._util.quiet():
        onx = torch.onnx.export(module, inputs, dynamo=True,
                                custom_translation_table=sparsec.ops.onnx_translations())
    return onx.model_proto.SerializeToString()


def check(sess, feed, want: torch.Tensor, what: str) -> float:
    got = torch.from_numpy(sess.run(None, feed)[0])
    err = float((got - want).abs().max() / want.abs().max())
    if not err <= 1e-4:
        raise SystemExit(f"parity failed for {what}: max relative error {err:.3g}")
    return err


def bench_attention(lengths, args) -> list[dict]:
    rows = []
    for L in lengths:
        g = torch.Generator().manual_seed(L)
        q, k, v = (torch.randn(1, HEADS, L, HEAD_DIM, generator=g) for _ in range(3))
        feed = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()}
        with torch.no_grad():
            want_dense = Dense()(q, k, v)
        dense_sess = session(export_bytes(Dense(), (q, k, v)), args.threads)
        base = {"L": L, "dense_err": check(dense_sess, feed, want_dense, f"dense L={L}"),
                "dense": timed(dense_sess, feed, args.warmup, args.runs)}
        del dense_sess
        for window, sink in LAYOUTS:
            if window >= L:
                continue
            lay = sliding_window(L, block=BLOCK, window=window, sink=sink)
            module = Sparse(lay)
            with torch.no_grad():
                want = module(q, k, v)
            kept = float(lay.kept_blocks().double().mean())
            slots = lay.kv_indices.shape[-1] + lay.full_kv_indices.shape[-1]
            nq = lay.num_q_blocks
            row = {**base, "layout": f"window={window},sink={sink}",
                   "density": lay.density(), "kept_blocks": kept,
                   "causal_grid_blocks": lay.grid_blocks(), "full_grid_blocks": nq * nq,
                   "gathered_slots": nq * slots,
                   "ideal": lay.grid_blocks() / kept, "work": nq * nq / (nq * slots)}
            sess = session(export_bytes(module, (q, k, v)), args.threads)
            row["gathered_err"] = check(sess, feed, want, f"gathered L={L} {row['layout']}")
            row["gathered"] = timed(sess, feed, args.warmup, args.runs)
            del sess
            if L == lengths[0] and window == LAYOUTS[0][0]:
                sess = session(export_bytes(module, (q, k, v), "dense"), args.threads)
                check(sess, feed, want, f"dense-masked L={L}")
                row["dense_masked"] = timed(sess, feed, args.warmup, args.runs)
                del sess
            row["speedup"] = row["dense"]["median_ms"] / row["gathered"]["median_ms"]
            rows.append(row)
            print(_attention_line(row), flush=True)
    return rows


def bench_models(lengths, args) -> list[dict]:
    tl = sparsec.load_model_file(ROOT / "examples" / "tiny_llama.py").module
    model = tl.init_weights(tl.Llama(tl.Config(max_len=max(lengths))))
    window, sink = LAYOUTS[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for L in lengths:
            tokens = torch.randint(0, 256, (1, L), generator=torch.Generator().manual_seed(L))
            program = sparsec.trace(model, (tokens,))
            feed = {"tokens": tokens.numpy()}
            row = {"L": L, "layout": f"window={window},sink={sink}", "model": "tiny_llama"}
            for name, passes in (("dense", []), ("sparse", [
                    f"block-sparse-attention:block={BLOCK},window={window},sink={sink}"])):
                out = Path(tmp) / f"{name}{L}"
                c = sparsec.compile(program, passes=passes, backend="onnx", out_dir=out,
                                    backend_options={"dynamic": "none"})
                row[f"{name}_err"] = c.report["onnx"]["max_rel_err"]  # checked by the backend
                if passes:
                    row["density"] = c.summary["attention"]["density"]["value"]
                sess = session(str(out / "model.onnx"), args.threads)
                row[name] = timed(sess, feed, args.warmup, args.runs)
                del sess, c
            row["speedup"] = row["dense"]["median_ms"] / row["sparse"]["median_ms"]
            rows.append(row)
            print(f"tiny_llama L={L}: dense {row['dense']['median_ms']:.1f} ms, sparse "
                  f"{row['sparse']['median_ms']:.1f} ms, speedup {row['speedup']:.2f}x "
                  f"(attention density {row['density']:.3f})", flush=True)
    return rows


def _attention_line(r: dict) -> str:
    return (f"L={r['L']} {r['layout']}: dense {r['dense']['median_ms']:.1f} ms, gathered "
            f"{r['gathered']['median_ms']:.1f} ms, speedup {r['speedup']:.2f}x, ideal "
            f"{r['ideal']:.2f}x ({r['speedup'] / r['ideal']:.2f} of it), work {r['work']:.2f}x "
            f"({r['speedup'] / r['work']:.2f} of it)")


def table(attn: list[dict], models: list[dict]) -> str:
    lines = ["| L | layout | density | dense export (ms) | gathered (ms) | speedup | ideal | "
             "speedup / ideal | work | speedup / work |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in attn:
        lines.append(f"| {r['L']} | {r['layout']} | {r['density']:.3f} | "
                     f"{r['dense']['median_ms']:.1f} | {r['gathered']['median_ms']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['ideal']:.2f}x | {r['speedup'] / r['ideal']:.2f} | "
                     f"{r['work']:.2f}x | {r['speedup'] / r['work']:.2f} |")
    masked = [r for r in attn if "dense_masked" in r]
    for r in masked:
        lines.append(f"\nsparsec's dense masked fallback at L={r['L']} ({r['layout']}): "
                     f"{r['dense_masked']['median_ms']:.1f} ms")
    if models:
        lines += ["", "| model | L | attention density | dense export (ms) | sparse export (ms) "
                  "| speedup |", "|---|---|---|---|---|---|"]
        for r in models:
            lines.append(f"| {r['model']} | {r['L']} | {r['density']:.3f} | "
                         f"{r['dense']['median_ms']:.1f} | {r['sparse']['median_ms']:.1f} | "
                         f"{r['speedup']:.2f}x |")
    return "\n".join(lines)


def environment(threads: int) -> dict:
    import onnx
    import onnxruntime as ort

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu, "cores": os.cpu_count(), "load_average": os.getloadavg(),
            "threads": threads, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": ort.__version__, "python": platform.python_version()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-models", action="store_true", help="attention alone only")
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "data" / "bench_onnx.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment(args.threads)
    print(json.dumps(env), flush=True)
    attn = bench_attention(args.lengths, args)
    models = [] if args.no_models else bench_models(args.lengths, args)
    env["load_average_after"] = os.getloadavg()
    result = {"environment": env, "attention": attn, "models": models,
              "config": {"heads": HEADS, "head_dim": HEAD_DIM, "block": BLOCK, "batch": 1,
                         "causal": True, "runs": args.runs, "warmup": args.warmup}}
    print()
    print(table(attn, models))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

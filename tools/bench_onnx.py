"""onnxruntime CPU time of block-sparse attention exported by sparsec vs the dense export.

    python tools/bench_onnx.py                      # lengths 1024 2048 4096, the default layouts
    python tools/bench_onnx.py --lengths 4096 --runs 9 --json out.json

Two parts, in one run, every session with 2 intra-op threads, sequential execution:

1. attention alone (batch 1, 8 heads, head dim 64, causal, blocks of 64): torch's ONNX export of
   `scaled_dot_product_attention(is_causal=True)` (the dense export) vs sparsec's gathered
   export of `sparsec::block_sparse_attention` under sliding-window + sink layouts of several
   densities (and sparsec's dense masked fallback at the first length);
2. whole models: examples/tiny_llama.py at max_len 4096 exported without passes (dense) and
   with block-sparse-attention (sliding window), through `sparsec.compile(..., backend="onnx")`;
3. one whole attention layer (q/k/v/o projections + causal attention, hidden 512, the shapes
   of part 1), each variant timed in its own process so its peak RSS is its own: torch's dense
   export at each `--opset` (at 23 the exporter emits the ONNX `Attention` op, which
   onnxruntime runs), onnxruntime's fused CPU attention (`com.microsoft.MultiHeadAttention`,
   unidirectional, in a hand-built graph), sparsec's gathered export per layout, and sparsec's
   `contrib` form (`com.microsoft.SparseAttention`) where onnxruntime runs it.

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
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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


def export_bytes(module, inputs, form: str = "gathered", opset: int | None = None) -> bytes:
    kwargs = {} if opset is None else {"opset_version": opset}
    with export_context(ExportContext(attention=form)), sparsec._util.quiet():
        onx = torch.onnx.export(module, inputs, dynamo=True,
                                custom_translation_table=sparsec.ops.onnx_translations(),
                                **kwargs)
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


# whole layers, one process per variant ----------------------------------------------------------
HIDDEN = HEADS * HEAD_DIM

# Runs in a fresh interpreter that imports only onnxruntime and numpy, so the peak RSS it
# reports is the session's (plus a fixed interpreter baseline, reported too).
WORKER = r"""
import json, statistics, sys, time
import numpy as np, onnxruntime as ort
def status(key):  # this process's own memory (ru_maxrss would carry the parent's over exec)
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
path, feed_path, out_path, threads, warmup, runs = sys.argv[1:7]
feed = dict(np.load(feed_path))
base = status("VmRSS")
so = ort.SessionOptions()
so.intra_op_num_threads = int(threads)
so.inter_op_num_threads = 1
so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
out = sess.run(None, feed)[0]
for _ in range(int(warmup)):
    sess.run(None, feed)
times = []
for _ in range(int(runs)):
    t = time.perf_counter()
    sess.run(None, feed)
    times.append(time.perf_counter() - t)
np.save(out_path, out)
peak = status("VmHWM")
print(json.dumps({"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3,
                  "runs": len(times), "peak_rss_bytes": peak, "baseline_rss_bytes": base}))
"""


class Layer(torch.nn.Module):
    """One attention layer: projections, causal attention (dense SDPA or a sparsec layout)."""

    def __init__(self, layout=None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        for name in "qkvo":
            lin = torch.nn.Linear(HIDDEN, HIDDEN, bias=False)
            lin.weight.data = torch.randn(HIDDEN, HIDDEN, generator=g) * HIDDEN ** -0.5
            setattr(self, name, lin)
        self.layout = layout
        if layout is not None:
            for name, t in zip(("num", "idx", "fnum", "fidx"), layout.tensors()):
                self.register_buffer(name, t)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (getattr(self, p)(x).view(b, n, HEADS, HEAD_DIM).transpose(1, 2)
                   for p in "qkv")
        if self.layout is None:
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            a = torch.ops.sparsec.block_sparse_attention(
                q, k, v, self.num, self.idx, self.fnum, self.fidx, None, HEAD_DIM ** -0.5, True,
                BLOCK, BLOCK)[0]
        return self.o(a.transpose(1, 2).reshape(b, n, HIDDEN))


def ort_fused_layer(layer: Layer) -> bytes:
    """The layer as MatMuls around onnxruntime's CPU `com.microsoft.MultiHeadAttention`
    (unidirectional = causal), the fused kernel a user of onnxruntime would pick."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(getattr(layer, p).weight.detach().T.contiguous().numpy(),
                                     f"w{p}") for p in "qkvo"]
    nodes = [helper.make_node("MatMul", ["x", f"w{p}"], [p]) for p in "qkv"]
    nodes.append(helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["a"],
                                  domain="com.microsoft", num_heads=HEADS, unidirectional=1))
    nodes.append(helper.make_node("MatMul", ["a", "wo"], ["y"]))
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, "L", HIDDEN]) for n in "xy"]
    graph = helper.make_graph(nodes, "layer", io[:1], io[1:], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


def run_worker(model: bytes, x: torch.Tensor, args, tmp: Path) -> tuple[dict, torch.Tensor]:
    import numpy as np

    path, feed, out = tmp / "m.onnx", tmp / "feed.npz", tmp / "out.npy"
    path.write_bytes(model)
    np.savez(feed, x=x.numpy())
    proc = subprocess.run([sys.executable, "-c", WORKER, str(path), str(feed), str(out),
                           str(args.threads), str(args.warmup), str(args.runs)],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        last = (proc.stderr.strip() or "no output").splitlines()[-1]
        raise RuntimeError(last[-240:])  # onnxruntime's reason is at the end
    return json.loads(proc.stdout.strip().splitlines()[-1]), torch.from_numpy(np.load(out))


def layer_variants(L: int, opsets) -> list[tuple[str, str, Any]]:
    """(name, layout description, how to build the model bytes) for one length."""
    dense = Layer()
    out = [(f"dense export, opset {o}", "causal", lambda o=o: (dense, export_bytes(
        dense, (torch.zeros(1, L, HIDDEN),), opset=o))) for o in opsets]
    out.append(("onnxruntime MultiHeadAttention (fused)", "causal",
                lambda: (dense, ort_fused_layer(dense))))
    for window, sink in LAYOUTS:
        if window >= L:
            continue
        lay = sliding_window(L, block=BLOCK, window=window, sink=sink)
        sparse = Layer(lay)
        desc = f"window={window},sink={sink}"
        out.append(("sparsec gathered", desc, lambda m=sparse: (m, export_bytes(
            m, (torch.zeros(1, L, HIDDEN),)))))
        if window == LAYOUTS[0][0]:
            out.append(("sparsec contrib (SparseAttention)", desc, lambda m=sparse: (
                m, export_bytes(m, (torch.zeros(1, L, HIDDEN),), "contrib"))))
    return out


def bench_layers(lengths, args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for L in lengths:
            x = torch.randn(1, L, HIDDEN, generator=torch.Generator().manual_seed(L))
            for name, desc, build in layer_variants(L, args.opset):
                row = {"L": L, "variant": name, "layout": desc}
                try:
                    module, model = build()
                    ops = _op_types(model)
                    row["attention_ops"] = sorted(ops & {"Attention", "MultiHeadAttention",
                                                         "SparseAttention", "Softmax"})
                    with torch.no_grad():
                        want = module(x)
                    r, got = run_worker(model, x, args, Path(tmp))
                    r["max_rel_err"] = float((got - want).abs().max() / want.abs().max())
                    if not r["max_rel_err"] <= 1e-4:
                        raise RuntimeError(f"parity failed: max relative error "
                                           f"{r['max_rel_err']:.3g}")
                    if module.layout is not None:
                        r["density"] = module.layout.density()
                    row.update(r)
                except Exception as e:  # a variant onnxruntime cannot run is a result too
                    row["error"] = str(e).strip().splitlines()[0][-240:] or type(e).__name__
                rows.append(row)
                print(_layer_line(row), flush=True)
    return rows


def _op_types(model: bytes) -> set[str]:
    import onnx

    proto = onnx.load_from_string(model)
    types = {n.op_type for n in proto.graph.node}
    for f in proto.functions:
        types |= {n.op_type for n in f.node}
    return types


def _layer_line(r: dict) -> str:
    head = f"layer L={r['L']} {r['variant']} ({r['layout']})"
    if "error" in r:
        return f"{head}: not run: {r['error']}"
    return (f"{head}: {r['median_ms']:.1f} ms, peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB "
            f"(+{(r['peak_rss_bytes'] - r['baseline_rss_bytes']) / 2**20:.0f} MiB over the "
            f"interpreter), ops {r['attention_ops']}, err {r['max_rel_err']:.1e}")


def layer_table(rows: list[dict]) -> str:
    lines = ["| L | variant | layout | attention ops | ms | × dense opset 18 | peak RSS MiB "
             "| over interpreter MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['L']} | {r['variant']} | {r['layout']} | - | not run: "
                         f"{r['error']} | - | - | - |")
            continue
        ref = next((x for x in rows if x["L"] == r["L"] and "median_ms" in x
                    and x["variant"].startswith("dense export")), None)
        speed = f"{ref['median_ms'] / r['median_ms']:.2f}x" if ref else "-"
        lines.append(f"| {r['L']} | {r['variant']} | {r['layout']} | "
                     f"{', '.join(r['attention_ops'])} | {r['median_ms']:.1f} | {speed} | "
                     f"{r['peak_rss_bytes'] / 2**20:.0f} | "
                     f"{(r['peak_rss_bytes'] - r['baseline_rss_bytes']) / 2**20:.0f} |")
    return "\n".join(lines)


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
    ap.add_argument("--parts", default="attention,models,layers",
                    help="comma-separated parts to run: attention, models, layers")
    ap.add_argument("--opset", type=int, nargs="+", default=[18, 23],
                    help="opsets of the dense layer export (23: the ONNX Attention op)")
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "data" / "bench_onnx.json")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    if parts - {"attention", "models", "layers"} or not parts:
        print(f"bench_onnx: --parts {args.parts!r}: choose from attention, models, layers",
              file=sys.stderr)
        raise SystemExit(2)
    if any(not 18 <= o <= 23 for o in args.opset):
        print(f"bench_onnx: --opset {args.opset}: choose opsets 18 to 23", file=sys.stderr)
        raise SystemExit(2)
    torch.set_num_threads(args.threads)
    env = environment(args.threads)
    print(json.dumps(env), flush=True)
    attn = bench_attention(args.lengths, args) if "attention" in parts else []
    models = ([] if args.no_models or "models" not in parts
              else bench_models(args.lengths, args))
    layers = bench_layers(args.lengths, args) if "layers" in parts else []
    env["load_average_after"] = os.getloadavg()
    result = {"environment": env, "attention": attn, "models": models, "layers": layers,
              "config": {"heads": HEADS, "head_dim": HEAD_DIM, "block": BLOCK, "batch": 1,
                         "causal": True, "runs": args.runs, "warmup": args.warmup}}
    print()
    if attn or models:
        print(table(attn, models))
    if layers:
        print("\n" + layer_table(layers))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

"""Run the zoo matrix (every `sparsec.testing.zoo` model × every feature) and write its table.

    python tools/gpu_zoo.py                          # CUDA, bf16, seq 2048, --backend triton
    python tools/gpu_zoo.py --device cpu --quick     # tiny float32 sizes (what CI runs)
    python tools/gpu_zoo.py --device cpu             # the docs/zoo.md CPU table
    python tools/gpu_zoo.py --models gpt2,bert --features trace,joint --out DIR

Writes DIR/zoo_table.md (pass/fail per cell, each failure's first line below the table)
and DIR/zoo_cells.json (every cell's measurements, error and seconds). DIR is $OUT, else
./gpu_zoo_out. Each cell runs on its own: a failure is recorded and the matrix goes on.
`--deadline S` skips the cells that would start after S seconds (shown as "time").
Exit code 0 when every cell ran and passed, 1 otherwise (the table is written either way).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsec.testing import zoo, zoo_matrix  # noqa: E402


def _config(args: argparse.Namespace, workdir: str) -> zoo_matrix.MatrixConfig:
    if args.device == "cpu":
        seq = args.seq or (32 if args.quick else 64)
        return zoo_matrix.MatrixConfig(device="cpu", dtype=torch.float32, seq=seq, batch=2,
                                       width=64, layers=2, heads=4, backend="eager",
                                       block=16, workdir=workdir)
    seq = args.seq or (512 if args.quick else 2048)
    # bf16 on the GPU; ONNX cells export float32 (onnxruntime takes no bf16 from numpy) at a
    # shorter length so onnxruntime's CPU build runs them in seconds
    return zoo_matrix.MatrixConfig(device=args.device, dtype=torch.bfloat16, seq=seq, batch=2,
                                   width=256, layers=2, heads=4, backend="triton",
                                   block=64, onnx_seq=min(seq, 512), workdir=workdir)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def run_matrix(args: argparse.Namespace) -> list[dict]:
    names = args.models.split(",") if args.models else zoo.names()
    features = args.features.split(",") if args.features else list(zoo_matrix.FEATURES)
    with tempfile.TemporaryDirectory(prefix="sparsec_zoo_") as work:
        return _run_models(args, names, features, work)


def _run_models(args: argparse.Namespace, names: list[str], features: list[str],
                work: str) -> list[dict]:
    cells, start = [], time.time()
    for name in names:
        entry = zoo.get(name)
        if name == "minilm" and args.device != "cpu":
            seq_cap = 512  # its position table holds 512
        else:
            seq_cap = None
        config = _config(args, work)
        if seq_cap:
            config.seq = min(config.seq, seq_cap)
        m = zoo_matrix.MatrixModel(entry, config)
        for feature in features:
            cells.append(_run_one(m, name, feature, start, args))
        del m
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return cells


def _run_one(m: zoo_matrix.MatrixModel, name: str, feature: str, start: float,
             args: argparse.Namespace) -> dict:
    cell = {"model": name, "feature": feature}
    if args.deadline and time.time() - start > args.deadline:
        cell.update(status="time", error="not run: past the deadline")
        return cell
    t, cpu = time.time(), time.process_time()
    try:
        cell["info"] = _jsonable(zoo_matrix.run_cell(m, feature))
        cell["status"] = "pass"
    except Exception as e:  # a failing cell is a result, not the end of the run
        cell.update(status="fail", error=_first_line(e))
        if args.verbose:
            traceback.print_exc()
    cell["seconds"] = round(time.time() - t, 2)
    cell["cpu_seconds"] = round(time.process_time() - cpu, 2)
    print(f"{name:16s} {feature:11s} {cell['status']:5s} {cell['seconds']:6.1f}s "
          f"(cpu {cell['cpu_seconds']:6.1f}s) "
          f"{cell.get('error', '')}", flush=True)
    return cell


def _jsonable(x):
    try:
        json.dumps(x)
        return x
    except TypeError:
        return json.loads(json.dumps(x, default=str))


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("transformers", "triton", "onnx", "onnxruntime", "onnxscript"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "-"
    return out


def device_name(device: str) -> str:
    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def table(cells: list[dict], args: argparse.Namespace, seconds: float) -> str:
    features = list(dict.fromkeys(c["feature"] for c in cells))
    models = list(dict.fromkeys(c["model"] for c in cells))
    by = {(c["model"], c["feature"]): c for c in cells}
    cfg = _config(args, "")
    v = versions()
    lines = [f"Run {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on "
             f"{device_name(args.device)}; " + ", ".join(f"{k} {x}" for k, x in v.items()) + ".",
             f"Sizes: {cfg.layers} layers, width {cfg.width}, {cfg.heads} heads, sequence "
             f"{cfg.seq}, batch {cfg.batch} (ONNX cells batch {cfg.batch + 1} too, float32"
             f"{', sequence ' + str(cfg.onnx_seq) if cfg.onnx_seq else ''}), "
             f"{str(cfg.dtype).removeprefix('torch.')}, backend {cfg.backend}; "
             f"{seconds:.0f} s in all.", "",
             "| model | " + " | ".join(features) + " |",
             "|---|" + "---|" * len(features)]
    notes = []
    for model in models:
        row = []
        for f in features:
            c = by.get((model, f))
            if c is None:
                row.append("")
            elif c["status"] == "pass":
                row.append("pass")
            else:
                notes.append(f"**{model} × {f}**: {c.get('error', '')}")
                row.append(f"**{c['status']}** [{len(notes)}]")
        lines.append(f"| {model} | " + " | ".join(row) + " |")
    passed = sum(c["status"] == "pass" for c in cells)
    lines += ["", f"{passed} of {len(cells)} cells pass."]
    if notes:
        lines += ["", "Failures (the error's first line):", ""]
        lines += [f"{i}. {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--quick", action="store_true", help="smaller sequence (CPU: 32, GPU: 512)")
    p.add_argument("--seq", type=int, default=0, help="sequence length (overrides the default)")
    p.add_argument("--models", default="", help="comma-separated zoo names (default: all)")
    p.add_argument("--features", default="", help="comma-separated features (default: all)")
    p.add_argument("--out", default="", help="output directory (default: $OUT or ./gpu_zoo_out)")
    p.add_argument("--deadline", type=float, default=0.0, help="seconds; later cells skipped")
    p.add_argument("-v", "--verbose", action="store_true", help="print tracebacks")
    args = p.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        print("gpu_zoo: torch sees no CUDA GPU; use --device cpu", file=sys.stderr)
        return 2
    out = Path(args.out or os.environ.get("OUT") or "gpu_zoo_out")
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    cells = run_matrix(args)
    text = table(cells, args, time.time() - start)
    tmp = out / "zoo_table.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "zoo_table.md")
    tmp = out / "zoo_cells.json.tmp"
    tmp.write_text(json.dumps({"versions": versions(), "cells": cells}, indent=1))
    tmp.replace(out / "zoo_cells.json")
    print(text)
    return 0 if all(c["status"] == "pass" for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())

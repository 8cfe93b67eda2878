"""report.json and the short human summary printed after a compile."""

from __future__ import annotations

import datetime
import json
import math
import platform
from typing import Any, Iterable

import torch

from .backends.base import Compiled

__all__ = ["build_report", "render_summary", "to_json"]


def build_report(compiled: Compiled, artifacts: Iterable[str] = ()) -> dict[str, Any]:
    """The report of a compile: passes, parameters, verification, backend and artifacts.

    Pass families add their own sections through `program.state["report"]` (for example
    `attention`), backends through `compiled.report` (for example `onnx`).
    """
    program = compiled.program
    from ._version import __version__

    report: dict[str, Any] = {
        "sparsec": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": {"torch": torch.__version__, "python": platform.python_version()},
        "model": {"name": program.source.name, "path": program.source.path,
                  "fingerprint": program.fingerprint},
        "passes": [{"name": r.name, "modified": r.modified, "stats": r.stats, "ms": round(r.ms, 3),
                    **({"verify": r.verify} if r.verify else {})} for r in program.history],
        "params": program.param_counts(),
        "props": sorted(program.props),
        "verify": program.state.get("verify"),
        "backend": compiled.backend,
        "notes": list(compiled.notes),
    }
    report.update(program.state.get("report", {}))
    report.update(compiled.report)
    report["artifacts"] = sorted(set(artifacts) | set(compiled.artifacts))
    return report


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(_clean(report), indent=2, sort_keys=False) + "\n"


def _clean(x: Any) -> Any:
    """JSON has no Infinity/NaN: write them as strings so the file stays standard."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def render_summary(report: dict[str, Any], console: Any = None) -> None:
    """Print the summary with rich: passes, parameters, verification, backend, artifacts."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"sparsec compile · {report['model']['name']}", title_justify="left")
    for col in ("pass", "modified", "stats", "ms"):
        table.add_column(col, justify="right" if col == "ms" else "left")
    for p in report["passes"]:
        stats = ", ".join(f"{k}={_fmt(v)}" for k, v in p["stats"].items())
        table.add_row(p["name"], "yes" if p["modified"] else "no", stats, f"{p['ms']:.1f}")
    if not report["passes"]:
        table.add_row("(no passes)", "", "", "")
    console.print(table)
    params = report["params"]
    share = params["trainable"] / params["total"] if params["total"] else 0.0
    console.print(f"params: {params['total']:,} total, {params['trainable']:,} trainable "
                  f"({share:.2%})")
    v = report.get("verify")
    if v:
        console.print(f"verify: max abs err {v['max_abs_err']:.3g}, max rel err "
                      f"{v['max_rel_err']:.3g} (reference: {v['reference']})")
    else:
        console.print("verify: skipped (--no-verify)")
    line = f"backend: {report['backend']}"
    if "onnx" in report and "max_abs_err" in report["onnx"]:
        line += f" · onnxruntime parity max abs err {report['onnx']['max_abs_err']:.3g}"
    console.print(line)
    mem = report.get("memory") or {}
    if "predicted_peak_bytes" in mem:
        line = (f"memory plan: predicted peak {_gib(mem['predicted_peak_bytes'])} (resident "
                f"{_gib(mem.get('resident_bytes', 0))})")
        if mem.get("measured_peak_bytes"):
            line += f", measured {_gib(mem['measured_peak_bytes'])}"
        if mem.get("eager_full_ft_peak_bytes"):
            line += f", eager full fine-tuning {_gib(mem['eager_full_ft_peak_bytes'])}"
        console.print(line)
    if report.get("sparse_finetune") and not report.get("deltas"):
        console.print("deltas: untrained (zeros); train them with `sparsec train … -o DIR` and "
                      "deploy with `--deltas DIR/deltas.safetensors`")
    elif report.get("deltas"):
        console.print(f"deltas: {report['deltas']['file']} ({report['deltas']['targets']} "
                      "targets)")
    for note in report.get("notes", []):
        console.print(f"note: {note}")
    if (report.get("attention") or {}).get("warning"):
        console.print(f"warning: block-sparse-attention: {report['attention']['warning']}")
    if report.get("artifacts"):
        console.print("wrote: " + ", ".join(report["artifacts"]))


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)

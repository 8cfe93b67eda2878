"""The fine-tuning quality study's results: learning-rate picks, the summary over seeds
(mean ± std per method, budget and step), its markdown table and goal check, the CSV, and the
plots — what `tools/bench_finetune_quality.py summarize` writes from the runs' JSON lines."""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["better", "pick_lrs", "summarize", "markdown", "goal_lines", "write_csv", "plot",
           "plot_curves", "attention_chart"]


def better(task: str):
    return min if task == "mlm" else max


def pick_lrs(rows: list[dict]) -> dict:
    """(task, method, rank) → the learning rate whose seed-0 run is best on validation."""
    groups: dict = {}
    for r in rows:
        if r["seed"] == 0:
            groups.setdefault((r["task"], r["method"], r["rank"]), []).append(r)
    return {k: better(k[0])(v, key=lambda r: r["curve"][-1]["val"])["lr"]
            for k, v in groups.items()}


# summary ---------------------------------------------------------------------------------------
def summarize(rows: list[dict]) -> list[dict]:
    """Per (task, method, rank) at its picked learning rate: mean ± std over seeds per step."""
    picked = pick_lrs(rows)
    out = []
    for (task, method, rank), lr in sorted(picked.items()):
        runs = [r for r in rows if (r["task"], r["method"], r["rank"], r["lr"]) ==
                (task, method, rank, lr)]
        curve = []
        for i, point in enumerate(runs[0]["curve"]):
            vals = [r["curve"][i]["test"] for r in runs]
            vals_v = [r["curve"][i]["val"] for r in runs if "val" in r["curve"][i]]
            curve.append({"step": point["step"], "mean": mean(vals), "std": std(vals),
                          "val": mean(vals_v) if vals_v else None})
        out.append({"task": task, "method": method, "rank": rank, "lr": lr,
                    "budget_kind": "none" if method in ("head", "full", "nm-2:4") else "rank",
                    "seeds": sorted(r["seed"] for r in runs), "trainable": runs[0]["trainable"],
                    "fraction": runs[0]["fraction"], "curve": curve,
                    "grid": sorted({r["lr"] for r in rows if (r["task"], r["method"], r["rank"])
                                    == (task, method, rank)})})
    return out


def mean(v: list[float]) -> float:
    return sum(v) / len(v)


def std(v: list[float]) -> float:
    if len(v) < 2:
        return 0.0
    m = mean(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def markdown(summary: list[dict]) -> str:
    lines = []
    for task in sorted({s["task"] for s in summary}):
        rows = [s for s in summary if s["task"] == task]
        steps = [p["step"] for p in rows[0]["curve"]]
        unit = "perplexity (lower is better)" if task == "mlm" else "accuracy % (higher is better)"
        lines += [f"**{task}**: test {unit}, mean ± std over seeds, at each step", "",
                  "| method | trainable in the encoder (share of block weights) | lr | seeds | "
                  + " | ".join(f"step {s}" for s in steps) + " |",
                  "|---|---|---|---|" + "---|" * len(steps)]
        for s in rows:
            cells = " | ".join(f"{p['mean']:.2f} ± {p['std']:.2f}" for p in s["curve"])
            name = s["method"] if s["method"] in ("head", "full", "nm-2:4") else \
                f"{s['method']} (r={s['rank']})" if s["rank"] else f"{s['method']} (share)"
            share = "all" if s["method"] == "full" else f"{s['fraction']:.2%}"
            lr = "—" if s["method"] == "head" else f"{s['lr']:g}"
            lines.append(f"| {name} | {s['trainable']:,} ({share}) | {lr} | "
                         f"{len(s['seeds'])} | {cells} |")
        lines.append("")
    return "\n".join(lines + goal_lines(summary))


def goal_lines(summary: list[dict]) -> list[str]:
    """The issue's goal at the last step: each delta vs full FT and vs LoRA at the same rank.

    gap: how much worse than full FT (points, or % of full FT's perplexity; positive = worse);
    vs LoRA: positive = better than LoRA; ± is the sum of the two seeds' standard deviations,
    so |difference| > ± is "outside the error bars"."""
    out = ["| task | delta method (r) | gap to full FT | within tolerance | vs LoRA (+ = better) "
           "| outside error bars |", "|---|---|---|---|---|---|"]
    for task in sorted({s["task"] for s in summary}):
        by = {(s["method"], s["rank"]): s["curve"][-1] for s in summary if s["task"] == task}
        full = next((v for (m, _), v in by.items() if m == "full"), None)
        for (m, r), d in sorted(by.items()):
            if not m.startswith("delta") or full is None or ("lora", r) not in by:
                continue
            lora = by[("lora", r)]
            if task == "mlm":
                gap = 100 * (d["mean"] - full["mean"]) / full["mean"]
                gap_s, tol = f"{gap:+.1f}% ± {100 * (d['std'] + full['std']) / full['mean']:.1f}", 2.0
                vs = lora["mean"] - d["mean"]
            else:
                gap = full["mean"] - d["mean"]
                gap_s, tol = f"{gap:+.2f} ± {d['std'] + full['std']:.2f} points", 1.0
                vs = d["mean"] - lora["mean"]
            err = d["std"] + lora["std"]
            out.append(f"| {task} | {m} ({r}) | {gap_s} | {'yes' if gap <= tol else 'no'} | "
                       f"{vs:+.2f} ± {err:.2f} | {'yes' if abs(vs) > err else 'no'} |")
    return out if len(out) > 2 else []


def write_csv(summary: list[dict], path: Path) -> None:
    lines = ["task,method,rank,lr,seeds,trainable,fraction,step,test_mean,test_std,val_mean"]
    for s in summary:
        for p in s["curve"]:
            lines.append(f"{s['task']},{s['method']},{s['rank']},{s['lr']},{len(s['seeds'])},"
                         f"{s['trainable']},{s['fraction']:.6g},{p['step']},{p['mean']:.6g},"
                         f"{p['std']:.6g},{'' if p['val'] is None else format(p['val'], '.6g')}")
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def _save_figure(fig, path: Path) -> None:
    """Lay out `fig` and write it to `path` (a PNG) through a temporary file."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def plot(summary: list[dict], path: Path) -> None:
    """Test metric at the last step vs trainable fraction, one line per method, per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task_names = sorted({s["task"] for s in summary})
    fig, axes = plt.subplots(1, len(task_names), figsize=(6.5 * len(task_names), 4.6),
                             squeeze=False)
    for ax, task in zip(axes[0], task_names):
        rows = [s for s in summary if s["task"] == task]
        for method in dict.fromkeys(s["method"] for s in rows):
            pts = sorted((s for s in rows if s["method"] == method), key=lambda s: s["fraction"])
            ys = [p["curve"][-1]["mean"] for p in pts]
            es = [p["curve"][-1]["std"] for p in pts]
            if method in ("full", "head"):  # whole-model or zero fraction: a reference band
                ax.axhline(ys[0], ls="--", lw=1, color="k" if method == "full" else "grey",
                           label=f"{method} ({ys[0]:.2f} ± {es[0]:.2f})")
                ax.axhspan(ys[0] - es[0], ys[0] + es[0], alpha=0.12,
                           color="k" if method == "full" else "grey")
                continue
            ax.errorbar([100 * p["fraction"] for p in pts], ys, yerr=es, marker="o", ms=4,
                        capsize=3, label=method)
        ax.set_xscale("log")
        ax.set_xlabel("trainable share of the targeted block weights (%)")
        ax.set_ylabel("test perplexity" if task == "mlm" else "test accuracy (%)")
        step = rows[0]["curve"][-1]["step"]
        ax.set_title(f"all-MiniLM-L6-v2, {task}, step {step}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save_figure(fig, path)


def plot_curves(summary: list[dict], path: Path, rank: int = 2) -> None:
    """Test metric vs step at rank `rank` (and full FT, head, nm), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task_names = sorted({s["task"] for s in summary})
    fig, axes = plt.subplots(1, len(task_names), figsize=(6.5 * len(task_names), 4.6),
                             squeeze=False)
    for ax, task in zip(axes[0], task_names):
        for s in summary:
            if s["task"] != task or (s["budget_kind"] == "rank" and s["rank"] != rank):
                continue
            steps = [p["step"] for p in s["curve"]]
            ax.errorbar(steps, [p["mean"] for p in s["curve"]],
                        yerr=[p["std"] for p in s["curve"]], marker="o", ms=3, capsize=2,
                        label=s["method"], ls="--" if s["method"] in ("full", "head") else "-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training steps")
        ax.set_ylabel("test perplexity" if task == "mlm" else "test accuracy (%)")
        ax.set_title(f"all-MiniLM-L6-v2, {task}, budget of LoRA r={rank}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save_figure(fig, path)


def attention_chart(paths: list[Path], path: Path) -> None:
    """Relative output error vs density, one line per layout family (bench_attention_accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(paths), figsize=(6.5 * len(paths), 4.4), squeeze=False)
    for ax, src in zip(axes[0], paths):
        result = json.loads(src.read_text())
        for layout in dict.fromkeys(r["layout"] for r in result["rows"]):
            pts = sorted((r for r in result["rows"] if r["layout"] == layout),
                         key=lambda r: r["density"])
            ax.plot([100 * r["density"] for r in pts], [r["rel_err"] for r in pts],
                    marker="o", ms=4, label=layout)
        ax.set_xlabel("density of the block grid (%)")
        ax.set_ylabel("relative output error vs dense attention")
        ax.set_title(result["model"].split(" (")[0] + f", L={result['length']}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save_figure(fig, path)

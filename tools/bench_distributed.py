"""Data-parallel fine-tuning throughput: sparsec `delta` (1%) vs full fine-tuning (DDP), 1 → N GPUs.

    torchrun --nproc-per-node 1 tools/bench_distributed.py --out $OUT/dist_1gpu.json
    torchrun --nproc-per-node 2 tools/bench_distributed.py --out $OUT/dist_2gpu.json \\
        --baseline $OUT/dist_1gpu.json          # the table with scaling efficiency
    torchrun --nproc-per-node 2 tools/bench_distributed.py --tiny    # a CPU smoke run (gloo)

The model is tools/bench_finetune.py's: examples/tiny_llama.py scaled to a Llama-style 0.84B
(16 layers, hidden 2048, GQA 16/4, SwiGLU 6144, vocab 32000, tied embeddings), bf16, AdamW,
batch 4 × 2048 tokens per GPU (each rank its own batch). Variants:

- full-ddp: every weight trainable, torch DDP (its bucketed all-reduce, counted by a comm
  hook), torch.optim.AdamW (foreach);
- delta: sparsec `sparse-finetune` delta at 1% (magnitude) on every block linear, trained by
  sparsec.training.DistributedTrainer (one flat all-reduce of the trainable gradients);
- delta-fsdp: the same with the frozen base sharded by FSDP2 (sparsec.fsdp.shard_program).

Each variant: warm-up steps, then the median step time over timed steps (CUDA events, per rank;
the slowest rank's median counts), the bytes handed to all-reduce per step (measured by
counting what each rank passes to the collectives) and the peak allocated memory during the
timed steps. Tokens/s counts all ranks' tokens. Prints a table (with --baseline: scaling
efficiency against the 1-GPU run) and writes JSON (--out, rank 0).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_finetune import config, lm_loss, measure  # noqa: E402

import sparsec  # noqa: E402
from sparsec.training import DistributedTrainer  # noqa: E402
from sparsec.training.distributed.launch import setup, teardown  # noqa: E402

VARIANTS = ("full-ddp", "delta", "delta-fsdp")
DELTA = "sparse-finetune:method=delta,density=0.01,select=magnitude"


def make_model(example, cfg, device, dtype, seed: int = 0):
    """tiny_llama's init (std 0.02, norms at 1), drawn on the device: the same on every rank."""
    with torch.device(device):
        model = example.Llama(cfg)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.02, generator=g)
    return model.to(dtype)


# variants -----------------------------------------------------------------------------------
def full_ddp(model, env, lr, batch):
    from torch.nn.parallel import DistributedDataParallel as DDP

    counted = {"bytes": 0, "calls": 0}

    def count(state, bucket):  # DDP's default all-reduce, counting what it sends
        buf = bucket.buffer()
        counted["bytes"] += buf.numel() * buf.element_size()
        counted["calls"] += 1
        return dist.all_reduce(buf.div_(env.world_size), async_op=True).get_future().then(
            lambda fut: fut.value()[0])

    ddp = DDP(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None,
              gradient_as_bucket_view=True)
    ddp.register_comm_hook(None, count)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def step(b):
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(ddp(*b), b)
        loss.backward()
        opt.step()
        return loss.detach()

    trainable = sum(p.numel() for p in model.parameters())
    return step, trainable, counted, {}


def sparse(model, env, lr, batch, fsdp: bool):
    from sparsec.fsdp import shard_program

    t0 = time.perf_counter()
    program = sparsec.trace(model, (batch[0],), check=False)  # tests verify; this times
    program.source = sparsec.ModelSource(name="llama", loss=lm_loss)
    program = sparsec.run_passes(program, [sparsec.parse_pass_arg(DELTA)], verify=False,
                                 inplace=True)
    module, extra = None, {}
    if fsdp:
        module, info = shard_program(program, env.device, env.world_size)
        extra["fsdp"] = info.to_json()
    trainer = DistributedTrainer(program, env, module=module, lr=lr, loss=lm_loss)
    extra["setup_s"] = time.perf_counter() - t0
    counted = trainer.comm
    return trainer.step, program.param_counts()["trainable"], counted, extra


def run_variant(name, example, cfg, env, dtype, lr, batch, args):
    model = make_model(example, cfg, env.device, dtype)
    if name == "full-ddp":
        step, trainable, counted, extra = full_ddp(model, env, lr, batch)
    else:
        step, trainable, counted, extra = sparse(model, env, lr, batch, name == "delta-fsdp")
    del model
    before = _comm_bytes(counted)
    r = measure(step, batch, args.warmup, args.steps, env.device)
    steps = args.warmup + args.steps
    after = _comm_bytes(counted)
    r.update(trainable=trainable, **extra,
             bytes_per_step=(after - before) // steps,
             total_steps=steps)
    return r


def _comm_bytes(counted) -> int:
    if isinstance(counted, dict):
        return counted["bytes"]
    return counted.bytes.get("gradients", 0) + counted.bytes.get("loss", 0)


# main ---------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a small config for a CPU smoke run")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--backend", choices=("gloo", "nccl"))
    ap.add_argument("--baseline", type=Path, help="JSON of the 1-GPU run, for scaling")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    env = setup(args.backend or ("gloo" if args.tiny or not torch.cuda.is_available()
                                 else "nccl"))
    try:
        return _bench(env, args)
    finally:
        teardown(env)


def _bench(env, args) -> int:
    cuda = env.device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    example, cfg, batch_size, seq = config(args.tiny)
    g = torch.Generator().manual_seed(1000 + env.rank)  # each rank its own batch
    batch = (torch.randint(0, cfg.vocab, (batch_size, seq), generator=g).to(env.device),)
    results = {"device": torch.cuda.get_device_name(env.device) if cuda else "cpu",
               "torch": torch.__version__, "world_size": env.world_size, "backend": env.backend,
               "config": vars(cfg) | {"batch_per_rank": batch_size, "seq": seq},
               "dtype": str(dtype), "date": time.strftime("%Y-%m-%d"), "variants": {}}
    for name in args.variants.split(","):
        r = run_variant(name, example, cfg, env, dtype, args.lr, batch, args)
        ranks = [None] * env.world_size
        dist.all_gather_object(ranks, r)
        slowest = max(x["step_s"] for x in ranks)
        merged = {**r, "step_s": slowest, "step_s_per_rank": [x["step_s"] for x in ranks],
                  "tokens_per_s": env.world_size * batch[0].numel() / slowest,
                  "peak_bytes": max((x["peak_bytes"] or 0) for x in ranks) or None}
        results["variants"][name] = merged
        if env.is_main:
            print(f"{name:11s} {env.world_size} GPU(s) {merged['tokens_per_s']:>10.0f} tok/s  "
                  f"step {slowest * 1e3:8.1f} ms  all-reduce {merged['bytes_per_step']:>14,} B  "
                  f"peak {(merged['peak_bytes'] or 0) / 2**30:6.2f} GiB", flush=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        dist.barrier()
    if env.is_main:
        baseline = json.loads(args.baseline.read_text()) if args.baseline else None
        table(results, baseline)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"run": results, "baseline": baseline}, indent=2,
                                           default=str))
    return 0


def table(results, baseline=None) -> None:
    runs = [b["run"] for b in [baseline] if b] + [results]
    full = results["variants"].get("full-ddp", {})
    print(f"\n{results['device']} · torch {results['torch']} · {results['backend']} · "
          f"{results['date']} · batch {results['config']['batch_per_rank']} × "
          f"{results['config']['seq']} per GPU")
    print("| variant | GPUs | trainable | tokens/s | scaling eff. | step ms | "
          "all-reduce B/step | × full FT | peak GiB/GPU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        for name, r in run["variants"].items():
            one = baseline["run"]["variants"].get(name) if baseline else None
            eff = "-"
            if one and run is results and run["world_size"] > 1:
                eff = f"{r['tokens_per_s'] / (run['world_size'] * one['tokens_per_s']):.2f}"
            ref = (baseline["run"] if run is not results and baseline else results)
            fb = ref["variants"].get("full-ddp", full).get("bytes_per_step")
            ratio = f"{r['bytes_per_step'] / fb:.4f}" if fb else "-"
            peak = f"{r['peak_bytes'] / 2**30:.2f}" if r.get("peak_bytes") else "-"
            print(f"| {name} | {run['world_size']} | {r['trainable']:,} | "
                  f"{r['tokens_per_s']:,.0f} | {eff} | {r['step_s'] * 1e3:.1f} | "
                  f"{r['bytes_per_step']:,} | {ratio} | {peak} |")


if __name__ == "__main__":
    raise SystemExit(main())

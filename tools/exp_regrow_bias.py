"""Experiments on prune–regrow, not sparsec features: the trainer patched for this process
only, then `tools/bench_finetune_quality.py` run with the remaining arguments.

- `--variant per-entry-bias` (the default): a regrown entry's AdamW update uses 1 − β^a
  (a = the updates it has had since it grew) instead of the tensor's shared step count t;
  entries never regrown are unchanged (a = t). Pass `--regrow-warmup 0`.
- `--variant protect-young`: an entry still in its warm-up (`regrow_warmup`) is never dropped
  (its drop score is +inf instead of |Δ|).

    python tools/exp_regrow_bias.py run --task mlm --n-val 128 --n-test 256 --threads 1 \
        --methods delta-magnitude-regrow --own-regrow-grid --grid 0.03 --seeds 3 \
        --regrow-warmup 0 --out docs/data/regrow_bias/mlm_magnitude_w0.jsonl

Results (docs/finetune.md, "Prune–regrow hurts here"): neither helps.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_finetune_quality as tool  # noqa: E402
from sparsec.training import trainer as tr  # noqa: E402

AGES: dict = {}
_orig_step = tr.Trainer._optimizer_step
_orig_regrow = tr.Trainer._regrow


def _age(t):
    return AGES.setdefault(id(t.values), torch.zeros(t.values.shape, dtype=torch.int64))


def _optimizer_step(self):
    befores = [(t, t.values.detach().clone()) for t in self.regrow_targets]
    _orig_step(self)
    with torch.no_grad():
        for t, before in befores:
            age = _age(t)
            age += 1
            st = self.optimizer.state[t.values]
            step = float(st["step"])
            young = age < step
            if not bool(young.any()):
                continue
            group = next(g for g in self.optimizer.param_groups
                         if any(p is t.values for p in g["params"]))
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], \
                group["weight_decay"]
            a = age.double()
            bc1, bc2 = 1 - b1 ** a, 1 - b2 ** a
            upd = (st["exp_avg"].double() / bc1) / (st["exp_avg_sq"].double().sqrt()
                                                    / bc2.sqrt() + eps)
            new = before.double() * (1 - lr * wd) - lr * upd
            t.values.copy_(torch.where(young, new.to(t.values.dtype), t.values))


def _regrow(self, t):
    old_idx, old_age = t.indices.clone(), _age(t).clone()
    assert bool((old_idx[1:] > old_idx[:-1]).all()), "indices not sorted"
    grown = _orig_regrow(self, t)
    pos = torch.searchsorted(old_idx, t.indices).clamp(max=old_idx.numel() - 1)
    found = old_idx[pos] == t.indices
    AGES[id(t.values)] = torch.where(found, old_age[pos], 0)
    return grown


def _regrow_protect(self, t):
    if t.age is None:
        return _orig_regrow(self, t)
    with torch.no_grad():
        young = t.age < t.warmup - 1
        saved, where = t.values[young].clone(), t.indices[young].clone()
        t.values[young] = 1e30  # the largest |Δ|: kept by the |Δ| ranking
        grown = _orig_regrow(self, t)
        t.values[torch.searchsorted(t.indices, where)] = saved
    return grown


def main(argv: list[str]) -> int:
    variant = "per-entry-bias"
    if argv[:1] == ["--variant"]:
        variant, argv = argv[1], argv[2:]
    if variant == "per-entry-bias":
        tr.Trainer._optimizer_step = _optimizer_step
        tr.Trainer._regrow = _regrow
    elif variant == "protect-young":
        tr.Trainer._regrow = _regrow_protect
    else:
        raise SystemExit(f"error: --variant {variant!r}: per-entry-bias or protect-young")
    return tool.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

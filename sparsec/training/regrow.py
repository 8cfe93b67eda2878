"""Prune–regrow (SpIEL) of `sparse-finetune`'s delta targets: which entries are dropped, where
new ones grow, and how their values, optimizer state and warm-up ages move with them.

Every `every` steps the |Δ| smallest `fraction` of a target's entries are dropped and as many
new entries grow where the frozen weight's gradient, summed over the last steps before the
regrowth, is largest. Kept entries keep their moments and age; grown ones start from zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..program import Program

__all__ = ["RegrowTarget", "regrow_targets", "regrow", "regrow_sums"]


@dataclass
class RegrowTarget:
    weight: torch.nn.Parameter  # the frozen base weight, whose gradient guides growth
    indices: torch.Tensor
    values: torch.nn.Parameter
    every: int
    fraction: float
    grad_sum: torch.Tensor | None = None
    warmup: int = 0
    # updates each entry has had since it was grown (int32, one per value; None: no warm-up);
    # entries at `warmup - 1` or more take full updates
    age: torch.Tensor | None = None

    def young(self) -> torch.Tensor | None:
        """The scale of each entry's next update, or None when every entry takes full ones."""
        if self.age is None or not bool((self.age < self.warmup - 1).any()):
            return None
        return ((self.age + 1).clamp(max=self.warmup).to(self.values.dtype) / self.warmup)

    def accumulates(self, step: int, window: int) -> bool:
        """Whether the step after `step` steps adds to the gradient sum (the last `window`
        steps before a regrowth)."""
        window = min(window, self.every)
        return step % self.every >= self.every - window


def regrow_targets(program: Program) -> list[RegrowTarget]:
    """The program's delta targets with `regrow_every` set."""
    state = program.state.get("sparse_finetune", {})
    out = []
    for weight, rec in state.get("targets", {}).items():
        if rec["method"] != "delta" or not rec.get("regrow_every"):
            continue
        p = rec["params"]
        values = program.gm.get_parameter(p["values"])
        warmup = int(rec.get("regrow_warmup", 0))  # records before the option: no warm-up
        age = (torch.full(values.shape, warmup, dtype=torch.int32, device=values.device)
               if warmup > 1 else None)
        out.append(RegrowTarget(program.gm.get_parameter(weight),
                                program.gm.get_buffer(p["indices"]), values,
                                rec["regrow_every"], rec["regrow_fraction"], warmup=warmup,
                                age=age))
    return out


@torch.no_grad()
def regrow(t: RegrowTarget, optimizer: torch.optim.Optimizer) -> int:
    """Drop and grow `t`'s entries on its gradient sum (then cleared); returns how many grew."""
    k = t.values.numel()
    grow = min(int(round(t.fraction * k)), t.weight.numel() - k)
    if grow <= 0 or t.grad_sum is None:
        t.grad_sum = None
        return 0
    keep = t.values.abs().topk(k - grow, sorted=False).indices
    score = t.grad_sum.abs().reshape(-1).float()
    score[t.indices] = -float("inf")  # grow only where Δ is not already trained
    new = score.topk(grow, sorted=False).indices
    t.grad_sum = None
    indices = torch.cat([t.indices[keep], new])
    order = indices.argsort()
    t.indices.copy_(indices[order])
    t.values.copy_(_moved(t.values, keep, grow, order))
    for key, s in optimizer.state.get(t.values, {}).items():
        if isinstance(s, torch.Tensor) and s.shape == t.values.shape:
            s.copy_(_moved(s, keep, grow, order))
    if t.age is not None:  # kept entries keep their age, grown ones start at 0
        t.age.copy_(_moved(t.age, keep, grow, order))
    return grow


def _moved(x: torch.Tensor, keep: torch.Tensor, grow: int, order: torch.Tensor) -> torch.Tensor:
    """Kept entries, then zeros for the grown ones, permuted into sorted-index order."""
    return torch.cat([x[keep], x.new_zeros(grow)])[order]


def regrow_sums(program: Program, targets: list[RegrowTarget]) -> dict[str, Any]:
    """Partial gradient sums by frozen weight name (a checkpoint inside a window)."""
    names = {id(p): n for n, p in program.gm.named_parameters()}
    return {names[id(t.weight)]: t.grad_sum for t in targets if t.grad_sum is not None}

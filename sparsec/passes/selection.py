"""Which weights train: budgets per target and the selection rules of `sparse-finetune`.

Every rule returns sorted, unique int64 indices, computed with whole-tensor torch operations
(top-k, SVD, random permutations), and is deterministic for a given seed.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch

from ..errors import BadInputError
from ..program import Program

__all__ = ["allocate", "select_entries", "select_units", "unit_scores", "calibration_grads",
           "low_rank"]

# Above this smaller dimension, `principal` uses a randomized SVD instead of the exact one.
_EXACT_SVD_MAX = 2048


def allocate(sizes: Sequence[int], *, density: float, budget: int = 0) -> list[int]:
    """How many units each target trains: `density` of each, or `budget` split by size.

    A budget is split in proportion to the sizes by largest remainder, so the counts add up to
    it exactly (a target may get 0); a density gives each target at least one unit.
    """
    if budget <= 0:
        return [min(s, max(1, round(density * s))) for s in sizes]
    total = sum(sizes)
    if budget > total:
        raise BadInputError(f"budget {budget} exceeds the {total} weights of the targets; lower "
                            "`budget` or add targets")
    exact = [budget * s / total for s in sizes]
    counts = [int(e) for e in exact]
    order = sorted(range(len(sizes)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order[:budget - sum(counts)]:
        counts[i] += 1
    return counts


def low_rank(weight: torch.Tensor, rank: int, seed: int = 0) -> torch.Tensor:
    """The best rank-`rank` approximation of `weight` (LIFT's principal component)."""
    w = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    r = min(rank, *w.shape)
    if min(w.shape) <= _EXACT_SVD_MAX:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    else:  # randomized SVD: its random projection comes from a seeded, forked generator
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(w, q=r + 8, niter=4)
        vh = v.mT
    return (u[:, :r] * s[:r]) @ vh[:r]


def select_entries(weight: torch.Tensor, k: int, how: str, *, rank: int = 8, seed: int = 0,
                   grad: torch.Tensor | None = None) -> torch.Tensor:
    """k flat indices of `weight` to train (sorted): `magnitude`, `gradient`, `random`,
    `principal`."""
    numel = weight.numel()
    if how == "random":
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(numel, generator=g)[:k]
    else:
        if how == "magnitude":
            score = weight.detach()
        elif how == "principal":
            score = low_rank(weight, rank, seed)
        elif how == "gradient":
            if grad is None:
                raise ValueError("select='gradient' needs the calibration gradient")
            score = grad
        else:
            raise ValueError(f"unknown selection {how!r}")
        idx = score.reshape(-1).abs().float().topk(k, sorted=False).indices.cpu()
    return idx.to(torch.int64).sort().values.to(weight.device)


def unit_scores(weight: torch.Tensor, axis: int, block: int,
                grad: torch.Tensor | None = None) -> torch.Tensor:
    """L2 norm of each block of `block` rows (axis 0) or columns (axis 1)."""
    t = (grad if grad is not None else weight).detach().float()
    t = t if axis == 0 else t.t()
    return t.reshape(t.shape[0] // block, -1).norm(dim=1)


def select_units(weight: torch.Tensor, count: int, axis: int, block: int, how: str, *,
                 seed: int = 0, grad: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted row (axis 0) or column (axis 1) indices of `count` blocks of `block` lines."""
    units = weight.shape[axis] // block
    if how == "random":
        g = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(units, generator=g)[:count]
    else:  # "norm"/"magnitude" on the weight, "gradient" on the calibration gradient
        chosen = unit_scores(weight, axis, block, grad if how == "gradient" else None) \
            .topk(count, sorted=False).indices.cpu()
    lines = (chosen.sort().values[:, None] * block + torch.arange(block)).reshape(-1)
    return lines.to(torch.int64).to(weight.device)


def calibration_grads(program: Program, names: Sequence[str],
                      batches: int) -> dict[str, torch.Tensor]:
    """|Σ dL/dW| over the first `batches` of model.py's batches, for the weights `names`."""
    src = program.source
    if src.loss is None or src.batches is None:
        raise BadInputError("select='gradient' needs loss() and batches() in model.py; add them "
                            "or choose select='magnitude'")
    gm = program.gm
    before = {n: p.requires_grad for n, p in gm.named_parameters()}
    params = [gm.get_parameter(n) for n in names]
    acc = [torch.zeros_like(p) for p in params]
    n_inputs = len(program.example_inputs)
    try:
        for p in gm.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        seen = 0
        for batch in itertools.islice(src.batches(), batches):
            batch = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
            loss = src.loss(gm(*batch[:n_inputs]), batch)
            for a, g in zip(acc, torch.autograd.grad(loss, params)):
                a.add_(g)
            seen += 1
        if seen == 0:
            raise BadInputError("batches() in model.py yielded nothing; it must yield batches")
    finally:
        for n, p in gm.named_parameters():
            p.requires_grad_(before[n])
    return {n: a.abs() for n, a in zip(names, acc)}

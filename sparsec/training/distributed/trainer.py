"""The data-parallel Trainer: each rank steps on its own batches, the gradients of the
trainable values are averaged over the ranks before the optimizer step (one all-reduce of a
flat buffer), and everything that decides (NaN/Inf checks, prune–regrow, checkpoints) is
agreed on by all ranks, so they stay bit-identical."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ...program import Program
from ..comm import CommCounter, GradientBucket, gather, rank_digest
from ..data import batch_tokens
from ..regrow import RegrowTarget
from ..trainer import Trainer
from .launch import DistEnv

__all__ = ["DistributedTrainer"]


class DistributedTrainer(Trainer):
    """A Trainer whose steps are data-parallel over the process group (see the module doc)."""

    def __init__(self, program: Program, env: DistEnv, *, module: Any = None, **kwargs: Any):
        super().__init__(program, **kwargs)
        self.env = env
        if module is not None:
            self.module = module
        self.comm = CommCounter()
        self.bucket = GradientBucket([p for _, p in program.trainable_parameters()],
                                     env.world_size, self.comm)
        self.samples = self.tokens = 0  # over all ranks, this run
        self._local = (0, 0)

    @property
    def world_size(self) -> int:
        return self.env.world_size

    def _prepare(self, batch: Any) -> tuple:
        batch = tuple(x.to(self.env.device, non_blocking=True) if isinstance(x, torch.Tensor)
                      else x for x in super()._prepare(batch))
        first = next((x for x in batch[:self.n_inputs] if isinstance(x, torch.Tensor)), None)
        rows = first.shape[0] if first is not None and first.dim() else 1
        self._local = (rows, batch_tokens(batch[:self.n_inputs]))
        return batch

    def _sync_gradients(self) -> None:
        self.bucket.all_reduce()

    def _loss_value(self, loss: torch.Tensor) -> float:
        """The mean loss over the ranks (the global batch's, for equal local batches); the
        samples and tokens of the step ride along in the same small all-reduce."""
        t = torch.stack([loss.detach().double().reshape(()),
                         *(torch.tensor(float(v), dtype=torch.float64, device=loss.device)
                           for v in self._local)])
        self.comm.all_reduce("loss", t)
        total, rows, tokens = t.tolist()
        self.samples += int(rows)
        self.tokens += int(tokens)
        return total / self.env.world_size

    def _agree(self, ok: bool) -> bool:
        """A NaN/Inf on any rank stops every rank at the same step (none waits forever)."""
        flag = torch.tensor([float(ok)], device=self.env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _regrow(self, t: RegrowTarget) -> int:
        """Decide on the gradient summed over all ranks, so every rank regrows alike."""
        g = t.grad_sum if t.grad_sum is not None else torch.zeros_like(t.weight)
        t.grad_sum = self.comm.all_reduce("regrow", g)
        if not bool(g.any()):  # no rank saw a gradient: as a single process would, skip
            t.grad_sum = None
        return super()._regrow(t)

    # checkpoints (collectives: every rank calls them) -------------------------------------------
    def consumed(self) -> tuple[int, int]:
        return self.samples, self.tokens

    def regrow_sums(self) -> dict[str, torch.Tensor]:
        """Partial regrow sums summed over the ranks (for a checkpoint inside a window)."""
        names = {id(p): n for n, p in self.program.gm.named_parameters()}
        have = torch.tensor([float(t.grad_sum is not None) for t in self.regrow_targets],
                            device=self.env.device)
        if not len(self.regrow_targets):
            return {}
        self.comm.all_reduce("checkpoint", have)
        out = {}
        for t, h in zip(self.regrow_targets, have.tolist()):
            if h:
                g = t.grad_sum.clone() if t.grad_sum is not None else torch.zeros_like(t.weight)
                out[names[id(t.weight)]] = self.comm.all_reduce("checkpoint", g)
        return out

    def checkpoint_digests(self, deltas: Any) -> list[str]:
        """Every rank's digest of its trained state, in rank order."""
        return gather(rank_digest(self.program, deltas), self.env.world_size)

    def restore_regrow_sums(self, sums: dict[str, torch.Tensor]) -> None:
        """A checkpoint's partial regrow sums (summed over its ranks) go to rank 0 alone, so
        the sum at the next regrowth counts them once."""
        if not self.env.is_main:
            return
        names = {id(p): n for n, p in self.program.gm.named_parameters()}
        for t in self.regrow_targets:
            g = sums.get(names[id(t.weight)])
            if g is not None:
                t.grad_sum = g.to(t.weight.device, t.weight.dtype)

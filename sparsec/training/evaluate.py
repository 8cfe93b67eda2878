"""Eval loss during training: the loss on held-out batches every N steps."""

from __future__ import annotations

import itertools
from typing import Any, Callable

import torch

from ..errors import BadInputError

__all__ = ["Evaluator", "EVAL_BATCHES"]

EVAL_BATCHES = 32  # at most this many eval batches per evaluation (the start of the eval file)


class Evaluator:
    """Mean loss of the forward graph over the eval batches; results in `report["eval"]`."""

    def __init__(self, batches: Callable[[], Any], every: int,
                 max_batches: int = EVAL_BATCHES):
        if every < 0:
            raise BadInputError(f"--eval-every is {every}; give 0 (only at the end) or more")
        self.batches, self.every, self.max_batches = batches, every, max_batches
        self.losses: list[tuple[int, float]] = []

    def due(self, step: int, last: int) -> bool:
        return step == last or (self.every > 0 and step % self.every == 0)

    @torch.no_grad()
    def __call__(self, trainer: Any, step: int) -> float:
        program = trainer.program
        joint = program.joint
        module = joint.forward if joint is not None else trainer.module
        n = joint.n_model_inputs if joint is not None else trainer.n_inputs
        loss_fn = program.source.loss
        total, count = 0.0, 0
        for batch in itertools.islice(self.batches(), self.max_batches):
            total += float(loss_fn(module(*batch[:n]), batch))
            count += 1
        value = total / max(count, 1)
        self.losses.append((step, value))
        trainer.stats.eval_losses.append((step, value))
        program.state.setdefault("report", {})["eval"] = self.section(count)
        return value

    def section(self, batches: int) -> dict[str, Any]:
        return {"every": self.every, "batches": batches,
                "loss_first": self.losses[0][1], "loss_last": self.losses[-1][1],
                "losses": [[s, v] for s, v in self.losses]}

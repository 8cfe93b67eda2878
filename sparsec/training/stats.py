"""What a training run did: the step statistics, the peak memory, and report.json's `train`
section built from them."""

from __future__ import annotations

import resource
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["TrainStats", "peak_memory", "train_section"]


@dataclass
class TrainStats:
    """What a training run did; `to_json()` is report.json's `train` section."""

    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    regrows: int = 0
    regrown_entries: int = 0
    samples: int = 0  # rows of the first input, summed (a checkpoint's progress)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, eval loss)

    def to_json(self) -> dict[str, Any]:
        mem, kind = peak_memory()
        every = max(1, len(self.losses) // 200)
        return {"steps": self.steps,
                "loss_first": self.losses[0] if self.losses else None,
                "loss_last": self.losses[-1] if self.losses else None,
                "loss_min": min(self.losses) if self.losses else None,
                "tokens": self.tokens, "seconds": round(self.seconds, 3),
                "tokens_per_s": self.tokens / self.seconds if self.seconds else 0.0,
                "peak_memory_bytes": mem, "peak_memory_kind": kind,
                "regrows": self.regrows, "regrown_entries": self.regrown_entries,
                "loss_curve_every": every, "loss_curve": self.losses[::every]}


def peak_memory() -> tuple[int, str]:
    """(bytes, kind): CUDA's max allocated memory, or the process's peak RSS on the CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_peak_rss"


def train_section(trainer: Any, completed: bool) -> dict[str, Any]:
    """report.json's `train` section: completion, learning rate, the trainer's stats."""
    section = {"completed": completed, "lr": trainer.learning_rate(), **trainer.stats.to_json()}
    if trainer.joint is not None:
        section["step"] = f"traced (joint-graph, {trainer.joint.optimizer.name})"
    return section

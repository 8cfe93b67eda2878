"""What every backend returns: a Compiled program, and the options lowering takes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..program import Program

__all__ = ["LowerOptions", "Compiled", "set_trainer_factory"]

# How `Compiled.train_step` makes its default trainer. Training sits above the backends, so it
# installs the factory when it is imported (sparsec.training, which `import sparsec` loads).
_trainer_factory: Callable[["Compiled"], Any] | None = None


def set_trainer_factory(factory: Callable[["Compiled"], Any]) -> None:
    """Install what `Compiled.train_step` calls to create the trainer of a forward program."""
    global _trainer_factory
    _trainer_factory = factory


@dataclass
class LowerOptions:
    """Options every backend understands; `extra` holds backend-specific ones."""

    out_dir: Path | None = None  # where artifacts go; None: a temporary directory or nowhere
    verify: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Compiled:
    """A lowered program: call it like the model.

    `report` holds the backend's section of report.json (keyed by backend name), `artifacts`
    the files it wrote (by short name), `notes` what a user should know (fallbacks taken),
    `summary` the whole report that `sparsec.compile` built.
    """

    program: Program
    backend: str
    fn: Callable[..., Any]
    report: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)  # the full report, once built
    trainer: Any = field(default=None, repr=False)  # a sparsec.training.Trainer, made on first use
    keepalive: Any = field(default=None, repr=False)  # e.g. a TemporaryDirectory holding artifacts

    def __call__(self, *inputs: Any) -> Any:
        return self.fn(*inputs)

    def train_step(self, batch: Any) -> float:
        """One optimizer step on `batch` (loss from model.py's `loss`); returns the loss.

        A training-step program (after `joint-graph`) runs its traced step, with the optimizer
        chosen in the recipe. Otherwise the first call creates a default
        `sparsec.training.Trainer` (AdamW); set `trainer` to choose the learning rate and the rest.
        """
        if self.program.is_training_step:
            out = self.fn(*batch)
            return float(out[0] if isinstance(out, (tuple, list)) else out)
        if self.trainer is None:
            if _trainer_factory is None:
                raise RuntimeError("Compiled.train_step needs sparsec.training; import sparsec")
            self.trainer = _trainer_factory(self)
        return self.trainer.step(batch)

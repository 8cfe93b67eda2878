"""The checkpoints of a training run, in one process or data-parallel: each one (the trained
tensors, optimizer.safetensors, recipe.toml, report.json) is written whole into a staging
directory and swapped into the run directory (sparsec.outputs.RunDirectory), so the run
directory always holds the last complete checkpoint, and `--resume` can continue it.

In a distributed run every rank calls `save` (the ranks' digests and the regrow sums are
collectives); rank 0 alone has the run directory and writes.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable

from .._util import atomic_write_text, remove_tree
from .deltas import extract_deltas, save_deltas
from ..errors import SparsecError
from ..outputs import write_outputs
from ..report import build_report, to_json
from ..trainable import DELTAS_FILE, save_trainable
from .checkpoint import OPTIMIZER_FILE, TrainState, save_optimizer_state

__all__ = ["Saver", "Sections"]

# report.json's sections of the run (train, distributed …) from (saver, completed, the
# checkpoint's step, the error that stopped the run)
Sections = Callable[["Saver", bool, "int | None", "BaseException | None"], dict[str, Any]]


class Saver:
    """Checkpoints of the trainer `compiled.trainer` into `run` (None: this rank takes part but
    does not write). `before`: the progress of the checkpoint the run resumed."""

    def __init__(self, compiled: Any, run: Any, pass_list: list, saved_file: str,
                 sections: Sections, before: TrainState | None = None):
        self.compiled, self.run, self.pass_list = compiled, run, pass_list
        self.saved_file = saved_file  # deltas or trainable tensors
        self.sections, self.before = sections, before
        self.step: int | None = None  # the global step of the last checkpoint
        self.completed = False
        self.digests: list[str] = []  # the ranks' digests of the last checkpoint (one process: [])
        self.report: dict[str, Any] = {}

    @property
    def trainer(self) -> Any:
        return self.compiled.trainer

    def progress(self) -> TrainState:
        """Where the run stands, counting the run it resumed."""
        b, t = self.before, self.trainer
        samples, tokens = t.consumed()
        return TrainState(
            global_step=t.global_step,
            batches_consumed=(b.batches_consumed if b else 0) + t.stats.steps * t.world_size,
            samples_consumed=(b.samples_consumed if b else 0) + samples,
            tokens_consumed=(b.tokens_consumed if b else 0) + tokens,
            world_size=t.world_size, lr=t.learning_rate(),
            base_fingerprint=t.program.fingerprint,
            loss_last=t.stats.losses[-1] if t.stats.losses else None)

    def save(self, completed: bool = False) -> dict[str, Any]:
        """A checkpoint of the current step, swapped in whole; returns its report."""
        t = self.trainer
        state = self.progress()
        deltas = (extract_deltas(t.program, info={"step": state.global_step})
                  if self.saved_file == DELTAS_FILE else None)
        self.digests = t.checkpoint_digests(deltas)
        if len(set(self.digests)) > 1:
            raise SparsecError(f"the ranks' trained values differ at step {t.global_step} "
                               f"(digests {self.digests}); this is a sparsec bug, please "
                               "report it")
        sums = t.regrow_sums()
        self.completed = completed
        if self.run is not None:
            self.report = self._commit(state, deltas, sums, completed)
        self.step = state.global_step
        return self.report

    def _commit(self, state: TrainState, deltas: Any, sums: dict, completed: bool
                ) -> dict[str, Any]:
        staging = self.run.stage()
        try:
            report = self._write(staging, state, deltas, sums, completed)
        except BaseException:
            remove_tree(staging)
            raise
        self.run.commit(staging)
        self.compiled.artifacts = {k: self.run.final / Path(v).name
                                   for k, v in self.compiled.artifacts.items()}
        return report

    def _write(self, staging: Path, state: TrainState, deltas: Any, sums: dict,
               completed: bool) -> dict[str, Any]:
        t, artifacts = self.trainer, self.compiled.artifacts
        path = staging / self.saved_file
        if deltas is None:
            save_trainable(t.program, path, info={"step": state.global_step})
        else:
            save_deltas(deltas, path)
        artifacts[self.saved_file] = path
        if t.optimizer is not None:  # a traced step keeps its optimizer state in the graph
            save_optimizer_state(staging / OPTIMIZER_FILE, t, state, sums)
            artifacts[OPTIMIZER_FILE] = staging / OPTIMIZER_FILE
        return self._outputs(staging, completed, state.global_step, None)

    def _outputs(self, where: Path, completed: bool, step: int | None,
                 error: BaseException | None) -> dict[str, Any]:
        self._set_sections(completed, step, error)
        return write_outputs(self.compiled, where, self.pass_list)

    def _set_sections(self, completed: bool, step: int | None,
                      error: BaseException | None) -> None:
        report = self.trainer.program.state.setdefault("report", {})
        report.update(self.sections(self, completed, step, error))

    def unwritten_report(self) -> dict[str, Any]:
        """The report of the run as it stands, written nowhere (a run without -o)."""
        self._set_sections(self.completed, self.step, None)
        return build_report(self.compiled)

    # after a failure (self.step: a checkpoint is in place) ---------------------------------------
    def note_error(self, error: BaseException) -> None:
        """Add the error to the committed checkpoint's report.json (atomically)."""
        path = self.run.final / "report.json"
        with contextlib.suppress(OSError, ValueError):
            report = json.loads(path.read_text())
            report["train"]["error"] = error_line(error)
            report["train"]["steps_after_checkpoint"] = self.trainer.global_step - self.step
            atomic_write_text(path, to_json(report))

    def rewrite_report(self, error: BaseException) -> None:
        """Rewrite the committed checkpoint's report.json for the run as it stands, with the
        error (its train section says which step the checkpoint holds)."""
        self._outputs(self.run.final, False, self.step, error)


def error_line(error: BaseException) -> str:
    """What report.json's `train.error` says: the error's type and first line."""
    return f"{type(error).__name__}: {error}".splitlines()[0]

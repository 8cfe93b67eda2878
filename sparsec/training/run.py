"""A whole training run in one process: prepare, train, and with an output directory write a
checkpoint every `save_every` steps and at the end (sparsec.training.saver)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..backends import lower
from ..errors import BadInputError
from ..outputs import RunDirectory
from ..report import build_report
from ..trainable import DELTAS_FILE
from .prepare import prepare_training
from .saver import Saver
from .stats import TrainStats, train_section
from .trainer import Trainer

__all__ = ["TrainRun", "train_model", "step_callback"]


@dataclass
class TrainRun:
    """What `train_model` returns: the compiled program, its trainer and the report."""

    compiled: Any
    trainer: Trainer
    report: dict[str, Any]


def train_model(model: Any, *, steps: int, recipe: Any = None, passes: tuple = (),
                out_dir: Any = None, lr: float | None = None, save_every: int = 0,
                force: bool = False,
                verify: bool = True,
                on_step: Callable[[int, float, TrainStats], None] | None = None,
                source: Any = None, eval_every: int = 0) -> TrainRun:
    """Compile `model` (a model.py path or a Program) with the recipe, train `steps` steps on
    model.py's batches (or the data files of `source`), and with `out_dir` write a checkpoint
    there every `save_every` steps and at the end. `lr`: AdamW's learning rate (default 1e-3); a
    recipe with joint-graph passes trains with the optimizer it sets, so `lr` is refused there.
    `source`: a `sparsec.sources.SourceOptions` (data files, HF task); `eval_every`: the eval
    loss every N steps (and at the end) when it names eval data.

    Crash-safe: each checkpoint (deltas.safetensors, optimizer.safetensors, recipe.toml,
    report.json) is written into a staging directory and swapped in atomically, so `out_dir`
    always holds the last complete one, and `sparsec train --resume out_dir` continues it
    (even after kill -9). If training fails after a checkpoint, its report says
    `train.completed = false` with the error, and the error is raised.
    """
    prep = prepare_training(model, steps=steps, recipe=recipe, passes=passes, out_dir=out_dir,
                            lr=lr, force=force, verify=verify, source=source,
                            eval_every=eval_every)
    program = prep.program
    compiled = lower(program, "eager")
    trainer = Trainer(program, lr=prep.lr)
    compiled.trainer = trainer
    if out_dir is None:
        trainer.fit(program.source.batches, steps,
                    step_callback(trainer, on_step, evaluator=prep.evaluator, last=steps))
        program.state.setdefault("report", {})["train"] = train_section(trainer, True)
        return TrainRun(compiled, trainer, build_report(compiled))
    saver = Saver(compiled, RunDirectory(out_dir, force=force, inputs=prep.inputs),
                  prep.pass_list, prep.saved_file, _sections)
    try:
        trainer.fit(program.source.batches, steps,
                    step_callback(trainer, on_step, saver, save_every, prep.evaluator, steps))
    except (Exception, KeyboardInterrupt) as e:
        if saver.step is not None:
            saver.note_error(e)
            if isinstance(e, BadInputError):  # say where the good checkpoint is
                raise type(e)(f"{e}; the checkpoint of step {saver.step} is in {out_dir} "
                              f"(--resume {out_dir})") from e
        raise
    report = saver.save(completed=True)
    return TrainRun(compiled, trainer, report)


def _sections(saver: Saver, completed: bool, step: int | None,
              error: BaseException | None) -> dict[str, Any]:
    """report.json's `train` section of a one-process checkpoint."""
    section = train_section(saver.trainer, completed)
    section["deltas_step" if saver.saved_file == DELTAS_FILE else "trainable_step"] = step
    return {"train": section}


def step_callback(trainer: Trainer, on_step: Any, saver: Saver | None = None, every: int = 0,
                  evaluator: Any = None, last: int = 0) -> Callable[[int, float], None]:
    """What runs after each step: a checkpoint every `every` steps, the eval loss when due,
    then `on_step(step, loss, stats)` (the progress display)."""
    def call(i: int, loss: float) -> None:
        if saver is not None and every and i % every == 0:
            saver.save()
        if evaluator is not None and evaluator.due(i, last):
            evaluator(trainer, i)
        if on_step is not None:
            on_step(i, loss, trainer.stats)
    return call

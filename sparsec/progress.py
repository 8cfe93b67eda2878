"""The training progress display: "compiling …" while the recipe compiles, then a bar with
loss, eval loss, tokens/s and peak memory (plain lines when stderr is not a terminal)."""

from __future__ import annotations

from typing import Any

import click

__all__ = ["TrainProgress"]


class TrainProgress:
    """Context manager; `update(step, loss, stats)` is `train_model`'s on_step."""

    def __init__(self, steps: int, status: str = "compiling"):
        self.steps, self.status_text = steps, status
        self.console = self.status = self.progress = self.task = None

    def __enter__(self) -> "TrainProgress":
        from rich.console import Console

        console = Console(stderr=True)
        if console.is_terminal:
            self.console = console
            self.status = console.status(f"{self.status_text} …")
            self.status.__enter__()
        return self  # not a terminal: no "compiling" line, so an error stays the only line

    def _start_bar(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.status.__exit__(None, None, None)
        self.status = None
        self.progress = Progress(
            TextColumn("training"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("eval {task.fields[eval]}"),
            TextColumn("{task.fields[tps]} tok/s"), TextColumn("peak {task.fields[mem]}"),
            TimeRemainingColumn(), console=self.console)
        self.progress.__enter__()
        self.task = self.progress.add_task("train", total=self.steps, loss="-", eval="-",
                                           tps="-", mem="-")

    def update(self, step: int, loss: float, stats: Any) -> None:
        from .training.stats import peak_memory

        evals = getattr(stats, "eval_losses", [])
        fresh = bool(evals) and evals[-1][0] == step
        if self.console is None:
            if fresh or step == 1 or step == self.steps or step % max(1, self.steps // 10) == 0:
                extra = f" eval {evals[-1][1]:.4f}" if fresh else ""
                click.echo(f"step {step}/{self.steps} loss {loss:.4f}{extra}", err=True)
            return
        if self.progress is None:
            self._start_bar()
        tps = stats.tokens / stats.seconds if stats.seconds else 0.0
        self.progress.update(self.task, completed=step, loss=f"{loss:.4f}",
                             eval=f"{evals[-1][1]:.4f}" if evals else "-", tps=f"{tps:,.0f}",
                             mem=f"{peak_memory()[0] / 2**20:,.0f} MiB")

    def __exit__(self, *exc: Any) -> None:
        if self.status is not None:
            self.status.__exit__(*exc)
        if self.progress is not None:
            self.progress.__exit__(*exc)

"""Training a compiled program: AdamW over the trainable values only, with prune–regrow.

    trainer = Trainer(program, lr=1e-3)
    for batch in batches:
        loss = trainer.step(batch)

The optimizer sees only parameters with `requires_grad` (after `sparse-finetune`: the sparse
values, structured deltas, N:M weights and `dense` parameters), so optimizer state exists only
for them. Targets of `sparse-finetune` with `regrow_every = N` are pruned and regrown every N
steps (SpIEL): the |Δ| smallest `regrow_fraction` of the entries are dropped and as many new
entries grow where the gradient of the frozen weight, accumulated over the last
`regrow_window` steps before the regrowth, is largest. The optimizer state moves with the
entries: kept entries keep their moments, dropped slots are reset and regrown entries start
from zero moments and a zero value.
"""

from __future__ import annotations

import fnmatch
import itertools
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

from .errors import BadInputError
from .program import Program, Prop

__all__ = ["Trainer", "TrainStats", "TrainRun", "train_model", "batch_tokens", "peak_memory"]


@dataclass
class TrainStats:
    """What a training run did; `to_json()` is report.json's `train` section."""

    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    regrows: int = 0
    regrown_entries: int = 0
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


@dataclass
class _RegrowTarget:
    weight: torch.nn.Parameter  # the frozen base weight, whose gradient guides growth
    indices: torch.Tensor
    values: torch.nn.Parameter
    every: int
    fraction: float
    grad_sum: torch.Tensor | None = None


class Trainer:
    """AdamW over the program's trainable parameters, with prune–regrow for sparse deltas.

    `lr_overrides` maps parameter-name globs to learning rates (e.g. a task head's). The loss
    is `loss(output, batch)` (default: model.py's `loss`); a batch is a tuple whose first
    `len(example_inputs)` items are the model's inputs.

    A training-step program (after `joint-graph`) runs its traced step instead: loss, backward
    and the optimizer chosen in the recipe are in the graph, so the optimizer arguments here
    are not used (prune–regrow and `lr_overrides` are refused).
    """

    def __init__(self, program: Program, *, lr: float = 1e-3, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 loss: Callable[[Any, Any], torch.Tensor] | None = None,
                 lr_overrides: dict[str, float] | None = None, regrow_window: int = 4):
        self.program = program
        self.loss_fn = loss or program.source.loss
        if self.loss_fn is None:
            raise BadInputError(f"{program.source.name}: training needs a loss; define "
                                "loss(output, batch) in model.py")
        named = list(program.trainable_parameters())
        if not named:
            raise BadInputError("nothing to train: every parameter is frozen; add a "
                                "sparse-finetune pass to the recipe")
        self.joint = program.state.get("joint")
        self.regrow_window = max(1, regrow_window)
        self.regrow_targets = _regrow_targets(program)
        if self.joint is not None:
            _check_joint(program, self.regrow_targets, lr_overrides)
            self.optimizer = None  # the step graph updates parameters and optimizer state
            self.n_inputs = self.joint.n_model_inputs
        else:
            self.optimizer = torch.optim.AdamW(_groups(named, lr, lr_overrides or {}), lr=lr,
                                               betas=betas, eps=eps, weight_decay=weight_decay)
            self.n_inputs = len(program.example_inputs)
        self.stats = TrainStats()
        # what runs the forward (a distributed trainer may run a sharded copy of program.gm)
        self.module: Callable[..., Any] = program.gm
        # steps done before this trainer (a resumed run): the prune–regrow schedule counts them
        self.step_offset = 0

    @property
    def global_step(self) -> int:
        """Steps done, including those before a resumed run."""
        return self.step_offset + self.stats.steps

    @classmethod
    def for_compiled(cls, compiled: Any, **kwargs: Any) -> "Trainer":
        if compiled.backend != "eager":
            raise BadInputError(f"train_step runs on the eager backend; the {compiled.backend} "
                                "backend is for inference (compile with --backend eager)")
        return cls(compiled.program, **kwargs)

    # one step ------------------------------------------------------------------------------
    def step(self, batch: Any) -> float:
        """Forward, loss, backward and one AdamW step on `batch`; returns the loss."""
        batch = self._prepare(batch)
        start = time.perf_counter()
        if self.joint is not None:
            return self._finish_step(self._joint_loss(batch), batch, start)
        accumulating = [t for t in self.regrow_targets if self._accumulates(t)]
        for t in accumulating:
            t.weight.requires_grad_(True)
        self.optimizer.zero_grad(set_to_none=True)
        try:
            loss = self.loss_fn(self.module(*batch[:self.n_inputs]), batch)
            loss.backward()
        finally:
            for t in accumulating:
                t.weight.requires_grad_(False)
        for t in accumulating:
            g, t.weight.grad = t.weight.grad, None
            if g is not None:
                t.grad_sum = g if t.grad_sum is None else t.grad_sum.add_(g)
        self._sync_gradients()
        self.optimizer.step()
        self.stats.steps += 1
        for t in self.regrow_targets:
            if self.global_step % t.every == 0:
                grown = self._regrow(t)
                self.stats.regrown_entries += grown
                self.stats.regrows += int(grown > 0)
        return self._finish_step(loss, batch, start)

    def _joint_loss(self, batch: tuple) -> torch.Tensor:
        out = self.program.gm(*batch)
        self.stats.steps += 1
        return out[0] if isinstance(out, (tuple, list)) else out

    def _finish_step(self, loss: torch.Tensor, batch: tuple, start: float) -> float:
        value = self._loss_value(loss)
        self.stats.losses.append(value)
        self.stats.tokens += batch_tokens(batch[:self.n_inputs])
        self.stats.seconds += time.perf_counter() - start
        return value

    def learning_rate(self) -> float:
        """The base learning rate the steps use (the recipe's, for a traced step)."""
        if self.joint is not None:
            return self.joint.optimizer.lr
        return self.optimizer.defaults["lr"]

    def fit(self, batches: Callable[[], Iterable[Any]] | Iterable[Any], steps: int,
            on_step: Callable[[int, float], None] | None = None) -> TrainStats:
        """`steps` steps over `batches` (a callable is called again when it runs out)."""
        for i, batch in enumerate(itertools.islice(_cycle(batches), steps), start=1):
            loss = self.step(batch)
            if on_step is not None:
                on_step(i, loss)
        return self.stats

    # what a distributed trainer overrides ------------------------------------------------------
    def _prepare(self, batch: Any) -> tuple:
        return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)

    def _sync_gradients(self) -> None:
        """Between backward and the optimizer step (all-reduce in a distributed run)."""

    def _loss_value(self, loss: torch.Tensor) -> float:
        return float(loss.detach())

    # prune–regrow ----------------------------------------------------------------------------
    def _accumulates(self, t: _RegrowTarget) -> bool:
        window = min(self.regrow_window, t.every)
        return self.global_step % t.every >= t.every - window

    @torch.no_grad()
    def _regrow(self, t: _RegrowTarget) -> int:
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
        for key, s in self.optimizer.state.get(t.values, {}).items():
            if isinstance(s, torch.Tensor) and s.shape == t.values.shape:
                s.copy_(_moved(s, keep, grow, order))
        return grow


def _moved(x: torch.Tensor, keep: torch.Tensor, grow: int, order: torch.Tensor) -> torch.Tensor:
    """Kept entries, then zeros for the grown ones, permuted into sorted-index order."""
    return torch.cat([x[keep], x.new_zeros(grow)])[order]


def _regrow_targets(program: Program) -> list[_RegrowTarget]:
    state = program.state.get("sparse_finetune", {})
    out = []
    for weight, rec in state.get("targets", {}).items():
        if rec["method"] != "delta" or not rec.get("regrow_every"):
            continue
        p = rec["params"]
        out.append(_RegrowTarget(program.gm.get_parameter(weight),
                                 program.gm.get_buffer(p["indices"]),
                                 program.gm.get_parameter(p["values"]), rec["regrow_every"],
                                 rec["regrow_fraction"]))
    return out


def _check_joint(program: Program, regrow: list, lr_overrides: dict | None) -> None:
    """What a traced training step cannot do: its optimizer is fixed in the graph."""
    if regrow:
        raise BadInputError("prune-regrow (regrow_every) changes which entries train, but the "
                            "joint-graph step is traced for fixed indices; set regrow_every = 0 "
                            "or drop the joint-graph passes from the recipe")
    if lr_overrides:
        raise BadInputError("per-parameter learning rates need the eager step; set lr in the "
                            "joint-graph pass or drop the joint-graph passes from the recipe")


def _groups(named: list[tuple[str, torch.nn.Parameter]], lr: float,
            overrides: dict[str, float]) -> list[dict[str, Any]]:
    by_lr: dict[float, list[torch.nn.Parameter]] = {}
    for name, p in named:
        rate = next((r for g, r in overrides.items() if fnmatch.fnmatchcase(name, g)), lr)
        by_lr.setdefault(rate, []).append(p)
    return [{"params": ps, "lr": rate} for rate, ps in by_lr.items()]


def _cycle(batches: Callable[[], Iterable[Any]] | Iterable[Any]) -> Iterator[Any]:
    while True:
        empty = True
        for batch in (batches() if callable(batches) else batches):
            empty = False
            yield batch
        if empty:
            raise BadInputError("batches() yielded no batch; it must yield at least one")
        if not callable(batches):
            return


def batch_tokens(inputs: tuple) -> int:
    """Tokens in a batch: the first input's elements if it holds token ids, else its rows
    (all dimensions but the last)."""
    t = next((x for x in inputs if isinstance(x, torch.Tensor)), None)
    if t is None:
        return 0
    if not t.is_floating_point() or t.dim() < 2:
        return t.numel()
    return t.numel() // t.shape[-1]


def peak_memory() -> tuple[int, str]:
    """(bytes, kind): CUDA's max allocated memory, or the process's peak RSS on the CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_peak_rss"


# a whole run: compile, train, write deltas and report ---------------------------------------------
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
    model.py's batches, and with `out_dir` write deltas.safetensors (every `save_every` steps
    and at the end), recipe.toml and report.json there. `lr`: AdamW's learning rate (default
    1e-3); a recipe with joint-graph passes trains with the optimizer it sets, so `lr` is
    refused there. `source`: a `sparsec.sources.SourceOptions` (data files, HF task);
    `eval_every`: the eval loss every N steps (and at the end) when it names eval data.

    The output directory is staged: it appears complete or not at all. If training fails
    after a checkpoint was saved, the directory still appears with that checkpoint and a
    report saying `train.completed = false`, and the error is raised.
    """
    from pathlib import Path

    from .api import resolve_passes, staged_output, write_outputs
    from .backends import lower
    from .evaluate import Evaluator
    from .passes.sparse_finetune import finetune_nodes
    from .sources import open_model
    from .trainable import DELTAS_FILE, output_file
    from .pipeline import run_passes
    from .report import build_report

    if steps < 1:
        raise BadInputError(f"--steps is {steps}; train at least one step")
    pass_list = resolve_passes(recipe, passes)
    joint = [p.name for p in pass_list if Prop.JOINT_GRAPH in p.establishes]
    if joint and lr is not None:
        raise BadInputError(f"--lr {lr:g} is not used: the recipe's {joint[0]} pass sets the "
                            "optimizer of the traced step; set lr in that pass instead")
    opened = None if isinstance(model, Program) else open_model(model, source)
    program = model if opened is None else opened.program
    evaluator = Evaluator(opened.eval_batches, eval_every) if opened and opened.eval_batches \
        else None
    if program.source.batches is None:
        raise BadInputError(f"{program.source.name}: training needs batches(); define it in "
                            "model.py (see examples/tiny_llama.py)")
    if out_dir is not None and Path(out_dir).exists() and not force:
        raise BadInputError(f"{out_dir}: output directory exists; pass --force to replace it")
    saved_file = output_file(pass_list, program)  # before compiling: refuse early
    program = run_passes(program, pass_list, verify=verify)
    if saved_file == DELTAS_FILE and not finetune_nodes(program):
        raise BadInputError("the recipe has no sparse-finetune pass, so there is nothing to save "
                            "as deltas; add one (see docs/finetune.md)")
    compiled = lower(program, "eager")
    trainer = Trainer(program, lr=1e-3 if lr is None else lr)
    compiled.trainer = trainer
    if out_dir is None:
        trainer.fit(program.source.batches, steps,
                    _callback(trainer, on_step, None, 0, evaluator, steps))
        program.state.setdefault("report", {})["train"] = _train_section(trainer, True)
        return TrainRun(compiled, trainer, build_report(compiled))
    error: BaseException | None = None
    with staged_output(out_dir, force=force) as staging:
        saver = _Saver(program, staging / saved_file)
        try:
            trainer.fit(program.source.batches, steps,
                        _callback(trainer, on_step, saver, save_every, evaluator, steps))
            saver.save(trainer.stats.steps)
        except (Exception, KeyboardInterrupt) as e:
            if saver.step is None:
                raise
            error = e
        section = _train_section(trainer, error is None)
        section["deltas_step" if saved_file == DELTAS_FILE else "trainable_step"] = saver.step
        if error is not None:
            section["error"] = f"{type(error).__name__}: {error}".splitlines()[0]
        program.state.setdefault("report", {})["train"] = section
        compiled.artifacts[saved_file] = Path(out_dir) / saved_file
        report = write_outputs(compiled, staging, pass_list)
    compiled.artifacts = {k: Path(out_dir) / Path(v).name for k, v in compiled.artifacts.items()}
    if error is not None:
        raise error
    return TrainRun(compiled, trainer, report)


class _Saver:
    def __init__(self, program: Program, path: Any):
        self.program, self.path, self.step = program, path, None

    def save(self, step: int) -> None:
        from .deltas import extract_deltas, save_deltas
        from .trainable import TRAINABLE_FILE, save_trainable

        if self.path.name == TRAINABLE_FILE:
            save_trainable(self.program, self.path, info={"step": step})
        else:
            save_deltas(extract_deltas(self.program, info={"step": step}), self.path)
        self.step = step


def _callback(trainer: Trainer, on_step: Any, saver: _Saver | None, every: int,
              evaluator: Any = None, last: int = 0):
    def call(i: int, loss: float) -> None:
        if saver is not None and every and i % every == 0:
            saver.save(i)
        if evaluator is not None and evaluator.due(i, last):
            evaluator(trainer, i)
        if on_step is not None:
            on_step(i, loss, trainer.stats)
    return call


def _train_section(trainer: Trainer, completed: bool) -> dict[str, Any]:
    section = {"completed": completed, "lr": trainer.learning_rate(), **trainer.stats.to_json()}
    if trainer.joint is not None:
        section["step"] = f"traced (joint-graph, {trainer.joint.optimizer.name})"
    return section

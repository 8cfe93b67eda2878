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
from zero moments and a zero value. With `regrow_warmup = W` a regrown entry's first W updates
are scaled by 1/W, 2/W, ..., 1 (its AdamW moments are not): AdamW moves a new entry by about
half the learning rate at once and by more later (the bias correction counts the tensor's
steps, not the entry's), and the entries grown where the gradient is largest cluster in a few
input columns, so unscaled they overshoot together (docs/finetune.md).
"""

from __future__ import annotations

import contextlib
import fnmatch
import itertools
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from ._util import first_line, user_frame
from .backends.base import set_trainer_factory
from .errors import BadInputError, SparsecError
from .program import Program, Prop

__all__ = ["Trainer", "TrainStats", "TrainRun", "train_model", "batch_tokens", "batch_rows",
           "peak_memory", "NonFiniteError", "cycle_batches", "train_section"]


class NonFiniteError(BadInputError):
    """A training step met a NaN/Inf loss or gradient; the values were not updated with it."""


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


@dataclass
class _RegrowTarget:
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
        self.joint = program.joint
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
            loss = self._user_loss(batch)
            loss.backward()
        finally:
            for t in accumulating:
                t.weight.requires_grad_(False)
        for t in accumulating:
            g, t.weight.grad = t.weight.grad, None
            if g is not None:
                t.grad_sum = g if t.grad_sum is None else t.grad_sum.add_(g)
        self._sync_gradients()
        self._check_finite(loss, [p.grad for p in self.optimizer_params() if p.grad is not None],
                           "gradient")
        self._optimizer_step()
        self.stats.steps += 1
        for t in self.regrow_targets:
            if self.global_step % t.every == 0:
                grown = self._regrow(t)
                self.stats.regrown_entries += grown
                self.stats.regrows += int(grown > 0)
        return self._finish_step(loss, batch, start)

    def _optimizer_step(self) -> None:
        """AdamW's step; regrown entries still in their warm-up take a scaled update."""
        warm = [(t, w, t.values.detach().clone()) for t in self.regrow_targets
                if (w := t.young()) is not None]
        self.optimizer.step()
        with torch.no_grad():
            for t, w, before in warm:
                v = t.values
                v.copy_(torch.where(w < 1, before + w * (v - before), v))
            for t in self.regrow_targets:
                if t.age is not None:
                    t.age.add_(1).clamp_(max=t.warmup)

    def _joint_loss(self, batch: tuple) -> torch.Tensor:
        out = self._user_call(lambda: self.program.gm(*batch), "the model failed on")
        loss = out[0] if isinstance(out, (tuple, list)) else out
        # the traced step has already updated the values: check them too
        self._check_finite(loss, [p for _, p in self.program.trainable_parameters()], "value")
        self.stats.steps += 1
        return loss

    def optimizer_params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _user_loss(self, batch: tuple) -> torch.Tensor:
        """loss(model(inputs), batch), with the user's errors as one-line BadInputErrors."""
        out = self._user_call(lambda: self.module(*batch[:self.n_inputs]), "the model failed on")
        loss = self._user_call(lambda: self.loss_fn(out, batch), "loss() raised on")
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise BadInputError(f"loss() returned {got}, not a scalar tensor; return e.g. "
                                "F.cross_entropy(...) (a mean)")
        return loss

    def _user_call(self, fn: Callable[[], Any], what: str) -> Any:
        try:
            return fn()
        except SparsecError:
            raise
        except Exception as e:
            where = user_frame(e, self.program.source.path)
            where = f"{where}: " if where else ""
            raise BadInputError(f"{where}{what} the batch of step {self.global_step + 1} "
                                f"({type(e).__name__}: {first_line(e)}); batches() must yield "
                                "what example_inputs() and loss() expect") from e

    def _check_finite(self, loss: torch.Tensor, tensors: list[torch.Tensor], kind: str) -> None:
        """Stop at the first NaN/Inf loss or gradient, before it reaches the values."""
        flags = [torch.isfinite(loss.detach()).all()] + [torch.isfinite(t).all() for t in tensors]
        ok = self._agree(bool(torch.stack(flags).all()))
        if not ok:
            what = "loss" if not bool(flags[0]) else f"a {kind}"
            raise NonFiniteError(f"step {self.global_step + 1}: {what} is NaN or Inf (loss "
                                 f"{float(loss.detach()):.4g}); training stopped there. Lower "
                                 "--lr, or fix loss()/batches() in model.py")

    def _agree(self, ok: bool) -> bool:
        """Whether every process found the step finite (one process: this one)."""
        return ok

    def _finish_step(self, loss: torch.Tensor, batch: tuple, start: float) -> float:
        value = self._loss_value(loss)
        self.stats.losses.append(value)
        self.stats.tokens += batch_tokens(batch[:self.n_inputs])
        self.stats.samples += batch_rows(batch[:self.n_inputs])
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
        for i, batch in enumerate(itertools.islice(cycle_batches(batches), steps), start=1):
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
        if t.age is not None:  # kept entries keep their age, grown ones start at 0
            t.age.copy_(_moved(t.age, keep, grow, order))
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
        values = program.gm.get_parameter(p["values"])
        warmup = int(rec.get("regrow_warmup", 0))  # records before the option: no warm-up
        age = (torch.full(values.shape, warmup, dtype=torch.int32, device=values.device)
               if warmup > 1 else None)
        out.append(_RegrowTarget(program.gm.get_parameter(weight),
                                 program.gm.get_buffer(p["indices"]), values,
                                 rec["regrow_every"], rec["regrow_fraction"], warmup=warmup,
                                 age=age))
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


def cycle_batches(batches: Callable[[], Iterable[Any]] | Iterable[Any]) -> Iterator[Any]:
    """The batches over and over (a callable is called again when it runs out)."""
    while True:
        empty = True
        for batch in _guarded(batches):
            empty = False
            yield batch
        if empty:
            raise BadInputError("batches() yielded no batch; it must yield at least one")
        if not callable(batches):
            return


def _guarded(batches: Callable[[], Iterable[Any]] | Iterable[Any]) -> Iterator[Any]:
    """The items of batches(), its errors as one-line BadInputErrors."""
    def fail(e: Exception) -> BadInputError:
        path = getattr(getattr(batches, "__code__", None), "co_filename", None)
        where = user_frame(e, path)
        return BadInputError(f"{where + ': ' if where else ''}batches() raised "
                             f"{type(e).__name__}: {first_line(e)}; fix batches() in model.py")
    try:
        it = iter(batches() if callable(batches) else batches)
    except SparsecError:
        raise
    except Exception as e:
        raise fail(e) from e
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except SparsecError:
            raise
        except Exception as e:
            raise fail(e) from e
        yield batch


def batch_rows(inputs: tuple) -> int:
    """Samples in a batch: the first tensor input's leading dimension (1 for a scalar)."""
    t = next((x for x in inputs if isinstance(x, torch.Tensor)), None)
    return 0 if t is None else (t.shape[0] if t.dim() else 1)


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
    from .outputs import RunDirectory, check_output_dir
    from .recipe import resolve_passes
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
    inputs = [None if isinstance(model, Program) else model, recipe]
    if out_dir is not None:
        check_output_dir(out_dir, force=force, inputs=inputs)
    opened = None if isinstance(model, Program) else open_model(model, source)
    program = model if opened is None else opened.program
    evaluator = Evaluator(opened.eval_batches, eval_every) if opened and opened.eval_batches \
        else None
    if program.source.batches is None:
        raise BadInputError(f"{program.source.name}: training needs batches(); define it in "
                            "model.py (see examples/tiny_llama.py)")
    saved_file = output_file(pass_list, program)  # before compiling: refuse early
    program = run_passes(program, pass_list, verify=verify)
    if saved_file == DELTAS_FILE:
        check_trainable(program, pass_list)
    compiled = lower(program, "eager")
    trainer = Trainer(program, lr=1e-3 if lr is None else lr)
    compiled.trainer = trainer
    if out_dir is None:
        trainer.fit(program.source.batches, steps,
                    _callback(trainer, on_step, None, 0, evaluator, steps))
        program.state.setdefault("report", {})["train"] = train_section(trainer, True)
        return TrainRun(compiled, trainer, build_report(compiled))
    saver = _Saver(compiled, RunDirectory(out_dir, force=force, inputs=inputs), pass_list,
                   saved_file)
    try:
        trainer.fit(program.source.batches, steps,
                    _callback(trainer, on_step, saver, save_every, evaluator, steps))
    except (Exception, KeyboardInterrupt) as e:
        if saver.step is not None:
            saver.record_error(e)
            if isinstance(e, BadInputError):  # say where the good checkpoint is
                raise type(e)(f"{e}; the checkpoint of step {saver.step} is in {out_dir} "
                              f"(--resume {out_dir})") from e
        raise
    report = saver.save(completed=True)
    return TrainRun(compiled, trainer, report)


def check_trainable(program: Program, pass_list: list) -> None:
    """Refuse a program without sparse fine-tuning ops, saying why there are none."""
    from .passes.sparse_finetune import finetune_nodes

    if finetune_nodes(program):
        return
    if not any(p.name == "sparse-finetune" for p in pass_list):
        raise BadInputError("the recipe has no sparse-finetune pass, so there is nothing to save "
                            "as deltas; add one (see docs/finetune.md)")
    skipped = program.state.get("report", {}).get("sparse_finetune", {}).get("skipped", {})
    if skipped:
        path, why = next(iter(skipped.items()))
        raise BadInputError(f"sparse-finetune rewrote no weight: the {len(skipped)} it matched "
                            f"were skipped ({path}: {why}); set `targets` to other layers")
    raise BadInputError("sparse-finetune rewrote no weight; set `targets` to module-path globs "
                        "of linear layers (see docs/finetune.md)")


class _Saver:
    """Checkpoints of a one-process run, each swapped into the run directory whole."""

    def __init__(self, compiled: Any, run: Any, pass_list: list, saved_file: str):
        self.compiled, self.run, self.pass_list = compiled, run, pass_list
        self.saved_file = saved_file  # deltas or trainable tensors
        self.step: int | None = None

    @property
    def trainer(self) -> Trainer:
        return self.compiled.trainer

    def save(self, completed: bool = False) -> dict[str, Any]:
        """Write a checkpoint of the current step and swap it in; return its report."""
        staging = self.run.stage()
        try:
            report = self._write(staging, completed)
        except BaseException:
            from ._util import remove_tree

            remove_tree(staging)
            raise
        self.run.commit(staging)
        self.step = self.trainer.global_step
        self.compiled.artifacts = {k: self.run.final / Path(v).name
                                   for k, v in self.compiled.artifacts.items()}
        return report

    def _write(self, staging: Path, completed: bool) -> dict[str, Any]:
        from .outputs import write_outputs
        from .checkpoint import OPTIMIZER_FILE, save_optimizer_state
        from .deltas import extract_deltas, save_deltas
        from .trainable import DELTAS_FILE, TRAINABLE_FILE, save_trainable

        t, program = self.trainer, self.trainer.program
        step = t.global_step
        path = staging / self.saved_file
        if self.saved_file == TRAINABLE_FILE:
            save_trainable(program, path, info={"step": step})
        else:
            save_deltas(extract_deltas(program, info={"step": step}), path)
        self.compiled.artifacts[self.saved_file] = path
        if t.optimizer is not None:  # a traced step keeps its optimizer state in the graph
            save_optimizer_state(staging / OPTIMIZER_FILE, t, self.progress(), _regrow_sums(t))
            self.compiled.artifacts[OPTIMIZER_FILE] = staging / OPTIMIZER_FILE
        section = train_section(t, completed)
        section["deltas_step" if self.saved_file == DELTAS_FILE else "trainable_step"] = step
        program.state.setdefault("report", {})["train"] = section
        return write_outputs(self.compiled, staging, self.pass_list)

    def progress(self) -> Any:
        from .checkpoint import TrainState

        t = self.trainer
        return TrainState(global_step=t.global_step, batches_consumed=t.global_step,
                          samples_consumed=t.stats.samples, tokens_consumed=t.stats.tokens,
                          world_size=1, lr=t.learning_rate(),
                          base_fingerprint=t.program.fingerprint,
                          loss_last=t.stats.losses[-1] if t.stats.losses else None)

    def record_error(self, error: BaseException) -> None:
        """Put the error into the committed checkpoint's report.json (atomically)."""
        import json

        from ._util import atomic_write_text
        from .report import to_json

        path = self.run.final / "report.json"
        with contextlib.suppress(OSError, ValueError):
            report = json.loads(path.read_text())
            report["train"]["error"] = f"{type(error).__name__}: {error}".splitlines()[0]
            report["train"]["steps_after_checkpoint"] = self.trainer.global_step - self.step
            atomic_write_text(path, to_json(report))


def _regrow_sums(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Partial prune–regrow gradient sums by weight name (a checkpoint inside a window)."""
    names = {id(p): n for n, p in trainer.program.gm.named_parameters()}
    return {names[id(t.weight)]: t.grad_sum for t in trainer.regrow_targets
            if t.grad_sum is not None}


def _callback(trainer: Trainer, on_step: Any, saver: _Saver | None, every: int,
              evaluator: Any = None, last: int = 0):
    def call(i: int, loss: float) -> None:
        if saver is not None and every and i % every == 0:
            saver.save()
        if evaluator is not None and evaluator.due(i, last):
            evaluator(trainer, i)
        if on_step is not None:
            on_step(i, loss, trainer.stats)
    return call


def train_section(trainer: Trainer, completed: bool) -> dict[str, Any]:
    """report.json's `train` section: completion, learning rate, the trainer's stats."""
    section = {"completed": completed, "lr": trainer.learning_rate(), **trainer.stats.to_json()}
    if trainer.joint is not None:
        section["step"] = f"traced (joint-graph, {trainer.joint.optimizer.name})"
    return section


set_trainer_factory(Trainer.for_compiled)

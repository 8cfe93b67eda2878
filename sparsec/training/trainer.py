"""The training loop of one process: AdamW over the trainable values only, with prune–regrow.

    trainer = Trainer(program, lr=1e-3)
    for batch in batches:
        loss = trainer.step(batch)

The optimizer sees only parameters with `requires_grad` (after `sparse-finetune`: the sparse
values, structured deltas, N:M weights and `dense` parameters), so optimizer state exists only
for them. Targets of `sparse-finetune` with `regrow_every = N` are pruned and regrown every N
steps (SpIEL, sparsec.training.regrow), on the gradient of the frozen weight accumulated over
the last `regrow_window` steps before the regrowth. The optimizer state moves with the
entries: kept entries keep their moments, dropped slots are reset and regrown entries start
from zero moments and a zero value. With `regrow_warmup = W` a regrown entry's first W updates
are scaled by 1/W, 2/W, ..., 1 (its AdamW moments are not): AdamW moves a new entry by about
half the learning rate at once and by more later (the bias correction counts the tensor's
steps, not the entry's), and the entries grown where the gradient is largest cluster in a few
input columns, so unscaled they overshoot together (docs/finetune.md).
"""

from __future__ import annotations

import fnmatch
import itertools
import time
from typing import Any, Callable, Iterable

import torch

from .._util import first_line, user_frame
from ..backends.base import set_trainer_factory
from ..errors import BadInputError, SparsecError
from ..program import Program
from .data import batch_rows, batch_tokens, cycle_batches
from .regrow import RegrowTarget, regrow, regrow_sums, regrow_targets
from .stats import TrainStats

__all__ = ["Trainer", "NonFiniteError"]


class NonFiniteError(BadInputError):
    """A training step met a NaN/Inf loss or gradient; the values were not updated with it."""


class Trainer:
    """AdamW over the program's trainable parameters, with prune–regrow for sparse deltas.

    `lr_overrides` maps parameter-name globs to learning rates (e.g. a task head's). The loss
    is `loss(output, batch)` (default: model.py's `loss`); a batch is a tuple whose first
    `len(example_inputs)` items are the model's inputs.

    A training-step program (after `joint-graph`) runs its traced step instead: loss, backward
    and the optimizer chosen in the recipe are in the graph, so the optimizer arguments here
    are not used (prune–regrow and `lr_overrides` are refused).
    """

    world_size = 1  # processes stepping together (sparsec.training.distributed: more)

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
        self.regrow_targets = regrow_targets(program)
        if self.joint is not None:
            _check_joint(self.regrow_targets, lr_overrides)
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
        accumulating = [t for t in self.regrow_targets
                        if t.accumulates(self.global_step, self.regrow_window)]
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

    # what a checkpoint reads -----------------------------------------------------------------
    def consumed(self) -> tuple[int, int]:
        """(samples, tokens) this trainer has trained on, over all processes."""
        return self.stats.samples, self.stats.tokens

    def regrow_sums(self) -> dict[str, torch.Tensor]:
        """Partial prune–regrow gradient sums by weight name (a checkpoint inside a window)."""
        return regrow_sums(self.program, self.regrow_targets)

    def checkpoint_digests(self, deltas: Any) -> list[str]:
        """Every process's digest of the trained state, to check they agree (one process:
        nothing to compare)."""
        return []

    # what a distributed trainer overrides ------------------------------------------------------
    def _prepare(self, batch: Any) -> tuple:
        return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)

    def _sync_gradients(self) -> None:
        """Between backward and the optimizer step (all-reduce in a distributed run)."""

    def _loss_value(self, loss: torch.Tensor) -> float:
        return float(loss.detach())

    def _agree(self, ok: bool) -> bool:
        """Whether every process found the step finite (one process: this one)."""
        return ok

    def _regrow(self, t: RegrowTarget) -> int:
        return regrow(t, self.optimizer)


def _check_joint(regrow_targets: list, lr_overrides: dict | None) -> None:
    """What a traced training step cannot do: its optimizer is fixed in the graph."""
    if regrow_targets:
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


set_trainer_factory(Trainer.for_compiled)

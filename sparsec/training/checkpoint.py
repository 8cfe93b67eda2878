"""Resumable training checkpoints: the optimizer state and the run's progress, as safetensors.

A checkpoint directory holds `deltas.safetensors` (sparsec.training.deltas: the trained values
and their indices), `optimizer.safetensors` (this module) and `recipe.toml`. The optimizer file
has, per trainable parameter name, AdamW's `exp_avg`, `exp_avg_sq` and `step`; partial
prune–regrow gradient sums (`regrow/<weight>`, summed over all ranks) when the checkpoint falls
inside an accumulation window; the age of each entry in its prune–regrow warm-up
(`regrow_age/<weight>`, int32, one per value) when the target has `regrow_warmup`; and under
the metadata key `sparsec_train` a JSON header with the progress (global step, batches, samples
and tokens consumed, the world size that wrote it).

The optimizer state is per trainable value, so it does not depend on the world size: a run on
N processes resumes on M.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._util import atomic_write_bytes, load_with_header, read_regular_file
from ..errors import BadInputError

__all__ = ["TrainState", "Checkpoint", "OPTIMIZER_FILE", "save_optimizer_state",
           "load_checkpoint", "restore_optimizer", "restore_regrow_ages"]

FORMAT = 1
OPTIMIZER_FILE = "optimizer.safetensors"
_REGROW = "regrow/"
_REGROW_AGE = "regrow_age/"


@dataclass
class TrainState:
    """Where a run stands: enough to continue its schedule and its data."""

    global_step: int
    batches_consumed: int  # items of model.py's batch stream used, over all ranks
    samples_consumed: int
    tokens_consumed: int
    world_size: int
    lr: float
    base_fingerprint: str
    loss_last: float | None = None


@dataclass
class Checkpoint:
    """A loaded checkpoint directory."""

    path: Path
    state: TrainState
    optimizer: dict[str, dict[str, torch.Tensor]]  # parameter name -> AdamW state
    regrow_sums: dict[str, torch.Tensor]  # frozen weight name -> partial gradient sum
    deltas: Any  # sparsec.training.deltas.Deltas
    recipe: Path | None
    regrow_ages: dict[str, torch.Tensor] = field(default_factory=dict)  # weight -> warm-up ages


def _named_state(trainer: Any) -> dict[str, dict[str, torch.Tensor]]:
    names = {id(p): n for n, p in trainer.program.trainable_parameters()}
    out = {}
    for p, s in trainer.optimizer.state.items():
        out[names[id(p)]] = {k: v for k, v in s.items() if isinstance(v, torch.Tensor)}
    return out


def save_optimizer_state(path: str | Path, trainer: Any, state: TrainState,
                         regrow_sums: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the trainer's optimizer state, regrow sums and `state` atomically."""
    from safetensors.torch import save

    tensors = {f"{name}/{k}": v.detach().cpu().contiguous().reshape(v.shape)
               for name, s in _named_state(trainer).items() for k, v in s.items()}
    for weight, g in (regrow_sums or {}).items():
        tensors[f"{_REGROW}{weight}"] = g.detach().cpu().contiguous()
    for weight, age in _regrow_ages(trainer).items():
        tensors[f"{_REGROW_AGE}{weight}"] = age.detach().cpu().contiguous()
    header = {"format": FORMAT, **asdict(state)}
    data = save(tensors, metadata={"sparsec_train": json.dumps(header, sort_keys=True)})
    path = Path(path)
    atomic_write_bytes(path, data)
    return path


def load_checkpoint(directory: str | Path) -> Checkpoint:
    """Read a checkpoint directory written by a distributed `sparsec train` run."""
    from safetensors import SafetensorError

    from .deltas import load_deltas

    d = Path(directory)
    opt = d / OPTIMIZER_FILE
    if not d.is_dir():
        raise BadInputError(f"{d}: no such checkpoint directory; give the -o directory of an "
                            "earlier `sparsec train` run started with torchrun")
    if not opt.exists():
        raise BadInputError(f"{d}: has no {OPTIMIZER_FILE}, so it cannot be resumed (a run "
                            "with joint-graph passes keeps its optimizer inside the graph); "
                            "give the -o directory of a `sparsec train` run")
    data = read_regular_file(opt, "checkpoint file")
    try:
        tensors, header = load_with_header(data, "sparsec_train")
    except (OSError, SafetensorError, ValueError, RecursionError) as e:
        raise BadInputError(f"{opt}: not a readable checkpoint ({type(e).__name__}); "
                            "resume from another checkpoint") from None
    if not isinstance(header, dict) or header.pop("format", None) != FORMAT:
        raise BadInputError(f"{opt}: no sparsec training header of format {FORMAT}; resume "
                            "from a checkpoint written by sparsec train")
    state = _train_state(opt, header)
    deltas = load_deltas(d / "deltas.safetensors")
    if deltas.info.get("step") != state.global_step:
        raise BadInputError(f"{d}: deltas.safetensors is from step {deltas.info.get('step')} but "
                            f"{OPTIMIZER_FILE} from step {state.global_step}; the checkpoint is "
                            "inconsistent, resume from another one")
    optimizer: dict[str, dict[str, torch.Tensor]] = {}
    regrow: dict[str, torch.Tensor] = {}
    ages: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key.startswith(_REGROW_AGE):
            ages[key[len(_REGROW_AGE):]] = t
        elif key.startswith(_REGROW):
            regrow[key[len(_REGROW):]] = t
        else:
            name, _, part = key.rpartition("/")
            optimizer.setdefault(name, {})[part] = t
    recipe = d / "recipe.toml"
    return Checkpoint(d, state, optimizer, regrow, deltas, recipe if recipe.exists() else None,
                      ages)


def _regrow_ages(trainer: Any) -> dict[str, torch.Tensor]:
    """Warm-up ages of the regrown entries by frozen weight name (targets with a warm-up)."""
    targets = [t for t in getattr(trainer, "regrow_targets", ()) if t.age is not None]
    if not targets:
        return {}
    names = {id(p): n for n, p in trainer.program.gm.named_parameters()}
    return {names[id(t.weight)]: t.age for t in targets}


def restore_regrow_ages(trainer: Any, saved: dict[str, torch.Tensor]) -> None:
    """Put a checkpoint's warm-up ages back (a target it lacks has no young entries)."""
    names = {id(p): n for n, p in trainer.program.gm.named_parameters()}
    for t in trainer.regrow_targets:
        name = names[id(t.weight)]
        age = saved.get(name)
        if age is None or t.age is None:
            continue
        if age.dtype != torch.int32 or age.shape != t.age.shape or bool((age < 0).any()):
            raise BadInputError(f"{name}: the checkpoint's regrow warm-up ages are not "
                                f"{t.age.numel()} non-negative int32 values; the checkpoint is "
                                "damaged or from another recipe, resume from another one")
        t.age.copy_(age.to(t.age.device).clamp(max=t.warmup))


_COUNTERS = ("global_step", "batches_consumed", "samples_consumed", "tokens_consumed")


def _train_state(opt: Path, header: dict[str, Any]) -> TrainState:
    """The header as a TrainState, every field present and of its type and range."""
    def bad(why: str) -> BadInputError:
        return BadInputError(f"{opt}: the training header {why}; the checkpoint is damaged or "
                             "was edited, resume from another one")

    missing = [k for k in TrainState.__dataclass_fields__ if k not in header and k != "loss_last"]
    if missing:
        raise bad(f"lacks {missing[0]!r}")
    for k in _COUNTERS + ("world_size",):
        v = header[k]
        if type(v) is not int or v < (1 if k == "world_size" else 0) or v >= 2**63:
            raise bad(f"has {k} = {v!r}, not a non-negative integer")
    for k in ("lr", "loss_last"):
        v = header.get(k)
        if k == "loss_last" and v is None:
            continue
        if type(v) not in (int, float) or not math.isfinite(v) or (k == "lr" and v <= 0):
            raise bad(f"has {k} = {v!r}, not a finite{' positive' if k == 'lr' else ''} number")
    if not isinstance(header["base_fingerprint"], str):
        raise bad("has a base_fingerprint that is not a string")
    return TrainState(**{k: header[k] for k in TrainState.__dataclass_fields__ if k in header})


_ADAMW_STATE = ("exp_avg", "exp_avg_sq", "step")


def restore_optimizer(trainer: Any, saved: dict[str, dict[str, torch.Tensor]]) -> None:
    """Load per-name optimizer state into a fresh trainer (its parameters must match)."""
    named = dict(trainer.program.trainable_parameters())
    missing, extra = sorted(set(named) - set(saved)), sorted(set(saved) - set(named))
    if missing or extra:
        which = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which this run lacks"
        raise BadInputError(f"the checkpoint's optimizer state {which}; resume with the recipe "
                            "the checkpoint was trained with")
    sd = trainer.optimizer.state_dict()
    order = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    names = {id(p): n for n, p in named.items()}
    state = {}
    for i, p in enumerate(order):
        s = saved[names[id(p)]]
        lacking = [k for k in _ADAMW_STATE if k not in s]
        if lacking:
            raise BadInputError(f"the checkpoint's optimizer state of {names[id(p)]} lacks "
                                f"{lacking[0]}; the checkpoint is damaged, resume from another one")
        for k, v in s.items():
            if not v.is_floating_point() or not bool(torch.isfinite(v).all()):
                raise BadInputError(f"{names[id(p)]}: the checkpoint's {k} is not finite "
                                    "floating-point; the checkpoint is damaged, resume from "
                                    "another one")
            if v.dim() and v.shape != p.shape:
                raise BadInputError(f"{names[id(p)]}: the checkpoint's {k} has shape "
                                    f"{tuple(v.shape)}, the parameter {tuple(p.shape)}; resume "
                                    "with the recipe the checkpoint was trained with")
        state[i] = dict(s)
    sd["state"] = state
    trainer.optimizer.load_state_dict(sd)

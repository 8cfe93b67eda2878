"""The one preparation of a training run, in one process or data-parallel: the checks that
refuse a run before any work, the resumed checkpoint and its recipe, tracing model.py, the
recipe's passes, and what the run will save."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .deltas import apply_deltas
from ..errors import BadInputError
from ..frontend import trace_file
from ..outputs import check_output_dir
from ..passes.sparse_finetune import finetune_nodes
from ..pipeline import run_passes
from ..program import Program, Prop
from ..recipe import dump_recipe, load_recipe, resolve_passes
from ..sources import open_model
from ..trainable import DELTAS_FILE, output_file
from .checkpoint import Checkpoint, load_checkpoint
from .comm import gather
from .evaluate import Evaluator

__all__ = ["Prepared", "prepare_training", "check_trainable", "DEFAULT_LR"]

DEFAULT_LR = 1e-3  # AdamW's learning rate unless --lr or a resumed checkpoint sets one


@dataclass
class Prepared:
    """A program ready to train (the recipe run, a resumed checkpoint's deltas applied) and
    what its run needs beside it."""

    program: Program
    pass_list: list
    inputs: list  # what the output directory must not hold or replace
    lr: float
    saved_file: str  # deltas.safetensors or trainable.safetensors
    checkpoint: Checkpoint | None = None
    evaluator: Evaluator | None = None


def prepare_training(model: Any, *, steps: int, recipe: Any, passes: tuple, out_dir: Any,
                     lr: float | None, force: bool, verify: bool, source: Any = None,
                     eval_every: int = 0, resume: Any = None, env: Any = None) -> Prepared:
    """Check and compile a run of `model` (a model.py path or a Program). `env` (a
    sparsec.training.distributed.launch.DistEnv) makes it a distributed run: model.py is traced on every
    rank, which must build the same base, and only deltas can be saved. `resume`: a
    checkpoint directory (distributed runs); its recipe and learning rate are the defaults."""
    if steps < 1:
        raise BadInputError(f"--steps is {steps}; train at least one step")
    # what must survive the output (the resumed checkpoint is read first, so -o may be it)
    inputs = [None if isinstance(model, Program) else model, recipe]
    ckpt = load_checkpoint(resume) if resume is not None else None
    pass_list, lr = _resolve(recipe, passes, lr, ckpt, resume)
    if env is None:
        _check_lr(pass_list, lr)
    if out_dir is not None:
        check_output_dir(out_dir, force=force, inputs=inputs)
    if env is not None:
        _check_no_joint(pass_list)
    opened = None if isinstance(model, Program) or env is not None else open_model(model, source)
    program = model if isinstance(model, Program) else (
        trace_file(model) if opened is None else opened.program)
    evaluator = Evaluator(opened.eval_batches, eval_every) if opened and opened.eval_batches \
        else None
    if program.source.batches is None:
        raise BadInputError(f"{program.source.name}: training needs batches(); define it in "
                            "model.py (see examples/tiny_llama.py)")
    saved_file = DELTAS_FILE if env is not None else output_file(pass_list, program)
    program = run_passes(program, pass_list, verify=verify)
    if saved_file == DELTAS_FILE:
        check_trainable(program, pass_list)
    if env is not None:
        _check_same_base(program, env.world_size)
    if ckpt is not None:
        apply_deltas(program, ckpt.deltas)
    return Prepared(program, pass_list, inputs, DEFAULT_LR if lr is None else lr, saved_file,
                    ckpt, evaluator)


def _resolve(recipe: Any, passes: tuple, lr: float | None, ckpt: Checkpoint | None,
             resume: Any) -> tuple[list, float | None]:
    """The passes and the learning rate; a resumed run defaults to its checkpoint's."""
    if ckpt is not None and recipe is None and not passes:
        if ckpt.recipe is None:
            raise BadInputError(f"{resume}: has no recipe.toml; pass the run's --recipe")
        recipe = ckpt.recipe
    pass_list = resolve_passes(recipe, passes)
    if ckpt is not None:
        _check_same_recipe(ckpt, pass_list)
        lr = ckpt.state.lr if lr is None else lr
    return pass_list, lr


def _check_same_recipe(ckpt: Checkpoint, pass_list: list) -> None:
    if ckpt.recipe is None:
        return
    if dump_recipe(load_recipe(ckpt.recipe)) != dump_recipe(pass_list):
        raise BadInputError(f"{ckpt.path}: the checkpoint was trained with another recipe "
                            f"({ckpt.recipe}); resume without --recipe/--pass to use it")


def _joint_passes(pass_list: list) -> list[str]:
    return [p.name for p in pass_list if Prop.JOINT_GRAPH in p.establishes]


def _check_lr(pass_list: list, lr: float | None) -> None:
    """A traced training step has its optimizer from the recipe: --lr would be ignored."""
    joint = _joint_passes(pass_list)
    if joint and lr is not None:
        raise BadInputError(f"--lr {lr:g} is not used: the recipe's {joint[0]} pass sets the "
                            "optimizer of the traced step; set lr in that pass instead")


def _check_no_joint(pass_list: list) -> None:
    joint = _joint_passes(pass_list)
    if joint:
        raise BadInputError(f"the recipe's {joint[0]} pass builds a training step whose "
                            "optimizer runs inside the backward, before gradients could be "
                            "averaged over the ranks; drop the joint-graph passes for "
                            "distributed training")


def _check_same_base(program: Program, world_size: int) -> None:
    """Every rank must have traced the same base weights (model.py seeds its init)."""
    prints = gather(program.fingerprint, world_size)
    if len(set(prints)) > 1:
        bad = next(r for r, f in enumerate(prints) if f != prints[0])
        raise BadInputError(f"model() built different base weights on rank 0 ({prints[0]}) and "
                            f"rank {bad} ({prints[bad]}); seed its initialization or load "
                            "fixed weights in model.py")


def check_trainable(program: Program, pass_list: list) -> None:
    """Refuse a program without sparse fine-tuning ops, saying why there are none."""
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

"""A whole data-parallel training run on torch.distributed, launched with torchrun.

    torchrun --nproc-per-node 2 -m sparsec train model.py --recipe R --steps N -o DIR [--fsdp]

Every rank traces model.py and runs the recipe (the base must come out identical on every
rank: this is checked), so every rank holds the same sparse parameters; rank 0's trainable
values and indices are broadcast once so the ranks start bit-identical. Each step, rank r of W
trains on items r, r + W, r + 2W, … of the stream of model.py's `batches()` (cycled), and the
gradients of the trainable values alone are averaged with one all-reduce of a flat buffer; the
frozen base weights get no gradient and so nothing to communicate. The optimizer then takes the
same step on every rank. Prune–regrow sums the frozen weights' accumulated gradients over the
ranks before it decides, so every rank regrows the same entries. With `--fsdp` the frozen base
is sharded with FSDP2 (sparsec.fsdp) and the trainable values stay whole on every rank.

Rank 0 alone writes the output: deltas.safetensors, optimizer.safetensors
(sparsec.training.checkpoint), recipe.toml and report.json, atomically; `--resume DIR`
continues such a run on any number of processes.
"""

from __future__ import annotations

from typing import Any, Callable

from ...backends import lower
from ...devices import retarget_device, retarget_graph
from ...errors import BadInputError
from ...outputs import RunDirectory
from ...program import Program
from ...trainable import DELTAS_FILE
from ..checkpoint import Checkpoint, restore_optimizer, restore_regrow_ages
from ..comm import broadcast_start, full_ft_bytes
from ..data import sharded_batches
from ..prepare import prepare_training
from ..run import TrainRun, step_callback
from ..saver import Saver, Sections, error_line
from ..stats import train_section
from .launch import DistEnv, leave_together, on_sigterm, restore_sigterm, setup, teardown
from .trainer import DistributedTrainer

__all__ = ["train_distributed"]


def train_distributed(model: Any, *, steps: int, recipe: Any = None, passes: tuple = (),
                      out_dir: Any = None, lr: float | None = None, save_every: int = 0,
                      force: bool = False, verify: bool = True, resume: Any = None,
                      fsdp: bool = False, backend: str | None = None,
                      on_step: Callable[[int, float, Any], None] | None = None) -> TrainRun:
    """`sparsec train` under torchrun (or resumed): see the module doc. Every rank calls it;
    rank 0 writes `out_dir` and returns the report, the others return `report = {}`.

    `lr` defaults to the checkpoint's when resuming, else 1e-3. With `resume`, the recipe
    defaults to the checkpoint's recipe.toml; a different one is refused.
    """
    env = setup(backend)
    previous = on_sigterm()
    try:
        run = _run(env, model, steps=steps, recipe=recipe, passes=passes, out_dir=out_dir,
                   lr=lr, save_every=save_every, force=force, verify=verify, resume=resume,
                   fsdp=fsdp, on_step=on_step)
        leave_together(env)
        return run
    finally:
        restore_sigterm(previous)
        teardown(env)


def _run(env: DistEnv, model: Any, *, steps: int, recipe: Any, passes: tuple, out_dir: Any,
         lr: float | None, save_every: int, force: bool, verify: bool, resume: Any, fsdp: bool,
         on_step: Any) -> TrainRun:
    prep = prepare_training(model, steps=steps, recipe=recipe, passes=passes, out_dir=out_dir,
                            lr=lr, force=force, verify=verify, resume=resume, env=env)
    program, ckpt = prep.program, prep.checkpoint
    module, fsdp_info = _place(program, env, fsdp)
    compiled = lower(program, "eager")
    compiled.fn = module
    trainer = DistributedTrainer(program, env, module=module, lr=prep.lr)
    compiled.trainer = trainer
    broadcast_start(program, trainer.comm)  # rank 0's start, bit for bit, on every rank
    start = _resume(trainer, ckpt)
    data = sharded_batches(program.source.batches, env.rank, env.world_size, start)
    writes = env.is_main and out_dir is not None
    run = RunDirectory(out_dir, force=force, inputs=prep.inputs) if writes else None
    saver = Saver(compiled, run, prep.pass_list, DELTAS_FILE, _sections(env, fsdp_info, ckpt),
                  ckpt.state if ckpt else None)
    try:
        trainer.fit(data, steps,
                    step_callback(trainer, on_step if env.is_main else None, saver, save_every))
        saver.save(completed=True)
    except (Exception, KeyboardInterrupt) as e:
        if saver.step is not None and saver.run is not None:
            saver.rewrite_report(e)  # into the last checkpoint's report.json
        raise
    if not env.is_main:
        return TrainRun(compiled, trainer, {})
    return TrainRun(compiled, trainer, saver.report if writes else saver.unwritten_report())


def _place(program: Program, env: DistEnv, fsdp: bool) -> tuple[Any, dict[str, Any] | None]:
    """Put the program on this rank's device (sharded with FSDP2 if asked)."""
    if not fsdp:
        retarget_device(program, env.device)
        return program.gm, None
    from ...fsdp import shard_program

    regrow = [w for w, r in program.state.get("sparse_finetune", {}).get("targets", {}).items()
              if r.get("regrow_every")]
    if regrow:
        raise BadInputError(f"prune–regrow (regrow_every on {regrow[0]}) needs the dense "
                            "gradient of the frozen weight, which --fsdp shards; set "
                            "regrow_every = 0 or train without --fsdp")
    retarget_graph(program.gm, env.device)
    module, info = shard_program(program, env.device, env.world_size)
    return module, info.to_json()


def _resume(trainer: DistributedTrainer, ckpt: Checkpoint | None) -> int:
    """Continue the checkpoint's optimizer and schedule; returns the batches it consumed."""
    if ckpt is None:
        return 0
    restore_optimizer(trainer, ckpt.optimizer)
    trainer.step_offset = ckpt.state.global_step
    trainer.restore_regrow_sums(ckpt.regrow_sums)
    restore_regrow_ages(trainer, ckpt.regrow_ages)  # the same on every rank
    return ckpt.state.batches_consumed


def _sections(env: DistEnv, fsdp_info: Any, ckpt: Checkpoint | None) -> Sections:
    """report.json's `train` and `distributed` sections (rank 0 writes them)."""
    def sections(saver: Saver, completed: bool, step: int | None,
                 error: BaseException | None) -> dict[str, Any]:
        trainer = saver.trainer
        section = train_section(trainer, error is None and completed)
        seconds = trainer.stats.seconds
        section.update(tokens=trainer.tokens,
                       tokens_per_s=trainer.tokens / seconds if seconds else 0.0,
                       deltas_step=step, global_step=trainer.global_step)
        if error is not None:
            section["error"] = error_line(error)
        return {"train": section,
                "distributed": _distributed_section(saver, env, fsdp_info, ckpt)}
    return sections


def _distributed_section(saver: Saver, env: DistEnv, fsdp_info: Any,
                         ckpt: Checkpoint | None) -> dict[str, Any]:
    trainer = saver.trainer
    steps = max(1, trainer.stats.steps)
    comm = trainer.comm
    per_step = (comm.bytes.get("gradients", 0) + comm.bytes.get("loss", 0)) // steps
    full = full_ft_bytes(trainer.program)
    ring = 2 * (env.world_size - 1) / env.world_size
    progress = saver.progress()
    out = {
        "world_size": env.world_size, "backend": env.backend, "device": env.device.type,
        "mode": "fsdp2" if fsdp_info else "replicated",
        "bytes_per_step": per_step,
        "gradient_bytes_per_step": trainer.bucket.bytes_per_step,
        "full_ft_bytes_per_step": full,
        "bytes_ratio_to_full_ft": per_step / full if full else None,
        "ring_bytes_sent_per_rank_per_step": int(ring * per_step),
        "full_ft_ring_bytes_sent_per_rank_per_step": int(ring * full),
        "collectives_per_step": (comm.calls.get("gradients", 0)
                                 + comm.calls.get("loss", 0)) / steps,
        "regrow_bytes": comm.bytes.get("regrow", 0),
        "regrow_bytes_per_step": comm.bytes.get("regrow", 0) // steps,
        "bytes_per_step_with_regrow": per_step + comm.bytes.get("regrow", 0) // steps,
        "setup_bytes": comm.bytes.get("setup", 0),
        "checkpoint_bytes": comm.bytes.get("checkpoint", 0),
        "global_step": progress.global_step, "batches_consumed": progress.batches_consumed,
        "samples_consumed": progress.samples_consumed,
        "tokens_consumed": progress.tokens_consumed,
        "rank_digests": saver.digests, "ranks_agree": len(set(saver.digests)) == 1,
    }
    if fsdp_info:
        out["fsdp"] = fsdp_info
    if ckpt is not None:
        out["resumed_from"] = {"path": str(ckpt.path), "global_step": ckpt.state.global_step,
                               "world_size": ckpt.state.world_size,
                               "loss_last": ckpt.state.loss_last}
    return out

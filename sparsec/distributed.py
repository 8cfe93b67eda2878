"""Data-parallel sparse fine-tuning on torch.distributed, launched with torchrun.

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

Rank 0 alone writes the output: deltas.safetensors, optimizer.safetensors (sparsec.checkpoint),
recipe.toml and report.json, atomically; `--resume DIR` continues such a run on any number of
processes.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NoReturn

import torch
import torch.distributed as dist

from .errors import BadInputError, SparsecError
from .devices import move_constants, retarget_device, retarget_graph
from .program import Program, Prop
from .train import Trainer, TrainRun, batch_tokens, check_trainable, cycle_batches, train_section

__all__ = ["DistEnv", "launched_by_torchrun", "setup", "sharded_batches", "CommCounter",
           "GradientBucket", "DistributedTrainer", "train_distributed", "rank_digest",
           "retarget_device", "retarget_graph", "move_constants", "full_ft_bytes"]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets its env)."""
    return all(v in os.environ for v in _TORCHRUN_VARS)


@dataclass
class DistEnv:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    owns_group: bool = False  # whether setup() created the process group (and so ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(backend: str | None = None) -> DistEnv:
    """Join the job torchrun started (or make a one-process group without torchrun).

    The backend defaults to NCCL on a machine with CUDA GPUs and gloo otherwise; NCCL trains
    on cuda:LOCAL_RANK, gloo on the CPU.
    """
    local = int(os.environ["LOCAL_RANK"]) if launched_by_torchrun() else 0
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("gloo", "nccl"):
        raise BadInputError(f"--backend is {backend!r}; choose 'gloo' (CPU) or 'nccl' (CUDA GPUs)")
    if backend == "nccl":
        if not torch.cuda.is_available() or torch.cuda.device_count() <= local:
            raise BadInputError(f"--backend nccl needs a CUDA GPU for local rank {local}, and "
                                f"this machine has {torch.cuda.device_count()}; use --backend "
                                "gloo on the CPU or fewer processes per node")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)  # so model.py's "cuda" means this rank's GPU
    else:
        device = torch.device("cpu")
    owns = not dist.is_initialized()
    if owns and launched_by_torchrun():
        dist.init_process_group(backend)
    elif owns:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    elif dist.get_backend() != backend:
        raise BadInputError(f"the process group already uses {dist.get_backend()}, not "
                            f"--backend {backend}")
    return DistEnv(dist.get_rank(), dist.get_world_size(), local, backend, device, owns)


def leave_together(env: DistEnv) -> None:
    """A barrier after a successful run: rank 0 writes the outputs while the others would
    already tear the group down, and a gloo peer that leaves early can abort the process
    (end_worker covers the abort that remained). Not after a failure, where the other ranks
    may never arrive (torchrun stops them)."""
    if env.world_size > 1 and dist.is_initialized():
        dist.barrier()


def teardown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()  # free the group's C++ side now, not during interpreter shutdown


def end_worker() -> NoReturn:
    """End a torchrun worker whose run finished (outputs in place, group destroyed) without
    the interpreter's shutdown: a 2-rank gloo job on a loaded CPU machine aborted there now
    and then ("terminate called without an active exception", exit -6, after every output was
    written), which made torchrun report the whole run as failed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# data ---------------------------------------------------------------------------------------------
def sharded_batches(batches: Callable[[], Iterable[Any]], rank: int, world_size: int,
                    start: int = 0) -> Iterator[Any]:
    """Items start + rank, start + rank + W, … of the cycled stream of `batches()`: the ranks
    together consume the stream in order, each item once, and a resumed run continues at
    `start` (the items consumed before it), whatever its world size."""
    return itertools.islice(cycle_batches(batches), start + rank, None, world_size)


# communication ------------------------------------------------------------------------------------
@dataclass
class CommCounter:
    """Bytes this rank handed to collectives, by purpose (the payload, not the wire bytes)."""

    bytes: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, purpose: str, tensor: torch.Tensor) -> None:
        self.bytes[purpose] = self.bytes.get(purpose, 0) + tensor.numel() * tensor.element_size()
        self.calls[purpose] = self.calls.get(purpose, 0) + 1

    def all_reduce(self, purpose: str, tensor: torch.Tensor) -> torch.Tensor:
        self.add(purpose, tensor)
        dist.all_reduce(tensor)
        return tensor


class GradientBucket:
    """Averages the gradients of the trainable parameters with one all-reduce per dtype.

    The gradients are packed into a flat buffer in a fixed order (the same on every rank), a
    missing gradient counting as zeros, and handed back as views of the reduced buffer.
    """

    def __init__(self, params: list[torch.nn.Parameter], world_size: int, comm: CommCounter):
        self.world_size, self.comm = world_size, comm
        self.groups: dict[torch.dtype, list[torch.nn.Parameter]] = {}
        for p in params:
            self.groups.setdefault(p.dtype, []).append(p)
        self.bytes_per_step = sum(p.numel() * p.element_size() for p in params)

    def all_reduce(self) -> None:
        for params in self.groups.values():
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                              for p in params])
            self.comm.all_reduce("gradients", flat)
            flat.div_(self.world_size)
            offset = 0
            for p in params:
                p.grad = flat[offset:offset + p.numel()].view_as(p)
                offset += p.numel()


def full_ft_bytes(program: Program) -> int:
    """What full fine-tuning's data parallelism all-reduces per step: the gradient of every
    parameter of the base model (not the sparse values the passes added), in its dtype, tied
    parameters once."""
    added = {rec["params"][p] for rec in program.state.get("sparse_finetune", {})
             .get("targets", {}).values() for p in ("values", "delta") if p in rec["params"]}
    return sum(p.numel() * p.element_size() for n, p in program.gm.named_parameters()
               if n not in added)


# the trainer --------------------------------------------------------------------------------------
class DistributedTrainer(Trainer):
    """A Trainer whose steps are data-parallel over the process group (see the module doc)."""

    def __init__(self, program: Program, env: DistEnv, *, module: Any = None, **kwargs: Any):
        super().__init__(program, **kwargs)
        self.env = env
        if module is not None:
            self.module = module
        self.comm = CommCounter()
        self.bucket = GradientBucket([p for _, p in program.trainable_parameters()],
                                     env.world_size, self.comm)
        self.samples = self.tokens = 0  # over all ranks, this run
        self._local = (0, 0)

    def _prepare(self, batch: Any) -> tuple:
        batch = tuple(x.to(self.env.device, non_blocking=True) if isinstance(x, torch.Tensor)
                      else x for x in super()._prepare(batch))
        first = next((x for x in batch[:self.n_inputs] if isinstance(x, torch.Tensor)), None)
        rows = first.shape[0] if first is not None and first.dim() else 1
        self._local = (rows, batch_tokens(batch[:self.n_inputs]))
        return batch

    def _sync_gradients(self) -> None:
        self.bucket.all_reduce()

    def _loss_value(self, loss: torch.Tensor) -> float:
        """The mean loss over the ranks (the global batch's, for equal local batches); the
        samples and tokens of the step ride along in the same small all-reduce."""
        t = torch.stack([loss.detach().double().reshape(()),
                         *(torch.tensor(float(v), dtype=torch.float64, device=loss.device)
                           for v in self._local)])
        self.comm.all_reduce("loss", t)
        total, rows, tokens = t.tolist()
        self.samples += int(rows)
        self.tokens += int(tokens)
        return total / self.env.world_size

    def _agree(self, ok: bool) -> bool:
        """A NaN/Inf on any rank stops every rank at the same step (none waits forever)."""
        flag = torch.tensor([float(ok)], device=self.env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _regrow(self, t) -> int:
        """Decide on the gradient summed over all ranks, so every rank regrows alike."""
        g = t.grad_sum if t.grad_sum is not None else torch.zeros_like(t.weight)
        t.grad_sum = self.comm.all_reduce("regrow", g)
        if not bool(g.any()):  # no rank saw a gradient: as a single process would, skip
            t.grad_sum = None
        return super()._regrow(t)

    def gathered_regrow_sums(self) -> dict[str, torch.Tensor]:
        """Partial regrow sums summed over the ranks (for a checkpoint inside a window)."""
        names = {id(p): n for n, p in self.program.gm.named_parameters()}
        have = torch.tensor([float(t.grad_sum is not None) for t in self.regrow_targets],
                            device=self.env.device)
        if not len(self.regrow_targets):
            return {}
        self.comm.all_reduce("checkpoint", have)
        out = {}
        for t, h in zip(self.regrow_targets, have.tolist()):
            if h:
                g = t.grad_sum.clone() if t.grad_sum is not None else torch.zeros_like(t.weight)
                out[names[id(t.weight)]] = self.comm.all_reduce("checkpoint", g)
        return out


def rank_digest(program: Program, deltas: Any) -> str:
    """sha256 of this rank's trained state, bit-exact: the deltas' tensors by file key
    (`<weight>/<part>`, as in deltas.safetensors, sorted), then any other trainable parameter
    (a `dense` one) by name."""
    h = hashlib.sha256()
    tensors = {f"{w}/{k}": t for w, td in deltas.targets.items() for k, t in td.tensors.items()}
    in_deltas = {rec["params"][p] for rec in program.state.get("sparse_finetune", {})
                 .get("targets", {}).values() for p in ("values", "delta", "weight")
                 if p in rec["params"]}
    dense = {n: p for n, p in program.trainable_parameters() if n not in in_deltas}
    for group in (tensors, dense):
        for name in sorted(group):
            t = group[name].detach().cpu().contiguous()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _gather(obj: Any, env: DistEnv) -> list[Any]:
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def _start_state(program: Program, env: DistEnv) -> list[torch.Tensor]:
    """Trainable values and sparse indices: what rank 0 broadcasts so all ranks start alike."""
    tensors = [p for _, p in program.trainable_parameters()]
    for rec in program.state.get("sparse_finetune", {}).get("targets", {}).values():
        for part in ("indices", "index"):
            if part in rec["params"]:
                tensors.append(program.get_tensor(rec["params"][part]))
    return tensors


# one run ------------------------------------------------------------------------------------------
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
    previous = _on_sigterm()
    try:
        run = _run(env, model, steps=steps, recipe=recipe, passes=passes, out_dir=out_dir,
                   lr=lr, save_every=save_every, force=force, verify=verify, resume=resume,
                   fsdp=fsdp, on_step=on_step)
        leave_together(env)
        return run
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        teardown(env)


class Terminated(SparsecError):
    """torchrun stopped this worker (another one failed)."""


def _on_sigterm() -> Any:
    """torchrun ends the other workers with SIGTERM when one fails: raise, so rank 0 still puts
    the last checkpoint in place (see _run)."""
    def handler(signum, frame):
        raise Terminated("stopped by SIGTERM (another worker failed?)")
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def _prepare_program(env: DistEnv, model: Any, pass_list: list, verify: bool,
                     ckpt: Any) -> Program:
    from .deltas import apply_deltas
    from .frontend import trace_file
    from .pipeline import run_passes

    joint = [p.name for p in pass_list if Prop.JOINT_GRAPH in p.establishes]
    if joint:
        raise BadInputError(f"the recipe's {joint[0]} pass builds a training step whose "
                            "optimizer runs inside the backward, before gradients could be "
                            "averaged over the ranks; drop the joint-graph passes for "
                            "distributed training")
    program = model if isinstance(model, Program) else trace_file(model)
    if program.source.batches is None:
        raise BadInputError(f"{program.source.name}: training needs batches(); define it in "
                            "model.py (see examples/tiny_llama.py)")
    program = run_passes(program, pass_list, verify=verify)
    check_trainable(program, pass_list)
    prints = _gather(program.fingerprint, env)
    if len(set(prints)) > 1:
        bad = next(r for r, f in enumerate(prints) if f != prints[0])
        raise BadInputError(f"model() built different base weights on rank 0 ({prints[0]}) and "
                            f"rank {bad} ({prints[bad]}); seed its initialization or load "
                            "fixed weights in model.py")
    if ckpt is not None:
        apply_deltas(program, ckpt.deltas)
    return program


def _place(program: Program, env: DistEnv, fsdp: bool) -> tuple[Any, dict[str, Any] | None]:
    """Put the program on this rank's device (sharded with FSDP2 if asked)."""
    if not fsdp:
        retarget_device(program, env.device)
        return program.gm, None
    from .fsdp import shard_program

    regrow = [w for w, r in program.state.get("sparse_finetune", {}).get("targets", {}).items()
              if r.get("regrow_every")]
    if regrow:
        raise BadInputError(f"prune–regrow (regrow_every on {regrow[0]}) needs the dense "
                            "gradient of the frozen weight, which --fsdp shards; set "
                            "regrow_every = 0 or train without --fsdp")
    retarget_graph(program.gm, env.device)
    module, info = shard_program(program, env.device, env.world_size)
    return module, info.to_json()


class _Saver:
    """Checkpoints: every rank takes part (the agreement check and the regrow sums are
    collectives); rank 0 alone writes, each file atomically."""

    def __init__(self, env: DistEnv, trainer: DistributedTrainer, lr: float,
                 before: Any = None):
        self.env, self.trainer, self.lr, self.before = env, trainer, lr, before
        self.run: Any = None  # rank 0's sparsec.outputs.RunDirectory, when it writes
        self.write_report: Callable[[Path], dict[str, Any]] | None = None
        self.report: dict[str, Any] = {}
        self.completed = False
        self.step: int | None = None
        self.digests: list[str] = []

    def progress(self):
        from .checkpoint import TrainState

        b, t = self.before, self.trainer
        return TrainState(
            global_step=t.global_step,
            batches_consumed=(b.batches_consumed if b else 0) + t.stats.steps * self.env.world_size,
            samples_consumed=(b.samples_consumed if b else 0) + t.samples,
            tokens_consumed=(b.tokens_consumed if b else 0) + t.tokens,
            world_size=self.env.world_size, lr=self.lr,
            base_fingerprint=t.program.fingerprint,
            loss_last=t.stats.losses[-1] if t.stats.losses else None)

    def save(self, completed: bool = False) -> None:
        """A checkpoint (a collective); rank 0 writes it whole into a staging directory and
        swaps that in, so the run directory always holds the last complete checkpoint."""
        from ._util import remove_tree
        from .checkpoint import OPTIMIZER_FILE, save_optimizer_state
        from .deltas import extract_deltas, save_deltas

        program = self.trainer.program
        state = self.progress()
        deltas = extract_deltas(program, info={"step": state.global_step})
        self.digests = _gather(rank_digest(program, deltas), self.env)
        if len(set(self.digests)) > 1:
            raise SparsecError(f"the ranks' trained values differ at step "
                               f"{self.trainer.global_step} (digests {self.digests}); this is "
                               "a sparsec bug, please report it")
        sums = self.trainer.gathered_regrow_sums()
        self.completed = completed
        if self.env.is_main and self.run is not None:
            staging = self.run.stage()
            try:
                save_optimizer_state(staging / OPTIMIZER_FILE, self.trainer, state, sums)
                save_deltas(deltas, staging / "deltas.safetensors")
                self.step = state.global_step
                self.report = self.write_report(staging)
            except BaseException:
                remove_tree(staging)
                raise
            self.run.commit(staging)
        self.step = state.global_step


def _run(env: DistEnv, model: Any, *, steps: int, recipe: Any, passes: tuple, out_dir: Any,
         lr: float | None, save_every: int, force: bool, verify: bool, resume: Any, fsdp: bool,
         on_step: Any) -> TrainRun:
    from .outputs import RunDirectory, check_output_dir
    from .recipe import resolve_passes
    from .backends import lower
    from .checkpoint import load_checkpoint, restore_optimizer, restore_regrow_ages

    if steps < 1:
        raise BadInputError(f"--steps is {steps}; train at least one step")
    # what must survive the output (the resumed checkpoint is read first, so -o may be it)
    inputs = [None if isinstance(model, Program) else model, recipe]
    ckpt = load_checkpoint(resume) if resume is not None else None
    if ckpt is not None and recipe is None and not passes:
        if ckpt.recipe is None:
            raise BadInputError(f"{resume}: has no recipe.toml; pass the run's --recipe")
        recipe = ckpt.recipe
    pass_list = resolve_passes(recipe, passes)
    if ckpt is not None:
        _check_same_recipe(ckpt, pass_list)
        lr = ckpt.state.lr if lr is None else lr
    lr = 1e-3 if lr is None else lr
    if out_dir is not None:
        check_output_dir(out_dir, force=force, inputs=inputs)
    program = _prepare_program(env, model, pass_list, verify, ckpt)
    module, fsdp_info = _place(program, env, fsdp)
    compiled = lower(program, "eager")
    compiled.fn = module
    trainer = DistributedTrainer(program, env, module=module, lr=lr)
    compiled.trainer = trainer
    with torch.no_grad():  # rank 0's start, bit for bit, on every rank
        for t in _start_state(program, env):
            trainer.comm.add("setup", t)
            dist.broadcast(t, 0)
    start = 0
    if ckpt is not None:
        restore_optimizer(trainer, ckpt.optimizer)
        trainer.step_offset, start = ckpt.state.global_step, ckpt.state.batches_consumed
        _restore_regrow_sums(trainer, ckpt.regrow_sums, env)
        restore_regrow_ages(trainer, ckpt.regrow_ages)  # the same on every rank
    data = sharded_batches(program.source.batches, env.rank, env.world_size, start)
    saver = _Saver(env, trainer, lr, ckpt.state if ckpt else None)

    def call(i: int, loss: float) -> None:
        if save_every and i % save_every == 0:
            saver.save()
        if on_step is not None and env.is_main:
            on_step(i, loss, trainer.stats)

    writes = env.is_main and out_dir is not None

    def report(staging: Path | None, error: BaseException | None = None) -> dict[str, Any]:
        return _report(compiled, trainer, saver, env, fsdp_info, ckpt, error, lr, staging,
                       pass_list)

    if writes:
        saver.run = RunDirectory(out_dir, force=force, inputs=inputs)
        saver.write_report = report
    try:
        trainer.fit(data, steps, call)
        saver.save(completed=True)
    except (Exception, KeyboardInterrupt) as e:
        if saver.step is None or saver.run is None:
            raise
        report(saver.run.final, e)  # into the last checkpoint's report.json
        raise
    if not writes:
        return TrainRun(compiled, trainer, report(None))
    compiled.artifacts = {k: Path(out_dir) / Path(v).name for k, v in compiled.artifacts.items()}
    return TrainRun(compiled, trainer, saver.report)


def _check_same_recipe(ckpt: Any, pass_list: list) -> None:
    from .recipe import dump_recipe, load_recipe

    if ckpt.recipe is None:
        return
    if dump_recipe(load_recipe(ckpt.recipe)) != dump_recipe(pass_list):
        raise BadInputError(f"{ckpt.path}: the checkpoint was trained with another recipe "
                            f"({ckpt.recipe}); resume without --recipe/--pass to use it")


def _restore_regrow_sums(trainer: DistributedTrainer, sums: dict[str, torch.Tensor],
                         env: DistEnv) -> None:
    """A checkpoint's partial regrow sums (summed over its ranks) go to rank 0 alone, so the
    sum at the next regrowth counts them once."""
    if not env.is_main:
        return
    names = {id(p): n for n, p in trainer.program.gm.named_parameters()}
    for t in trainer.regrow_targets:
        g = sums.get(names[id(t.weight)])
        if g is not None:
            t.grad_sum = g.to(t.weight.device, t.weight.dtype)


def _report(compiled: Any, trainer: DistributedTrainer, saver: _Saver, env: DistEnv,
            fsdp_info: Any, ckpt: Any, error: BaseException | None, lr: float,
            staging: Path | None, pass_list: list) -> dict[str, Any]:
    """report.json on rank 0 (written into `staging` when there is one); {} elsewhere."""
    if not env.is_main:
        return {}
    from .outputs import write_outputs
    from .report import build_report

    program = trainer.program
    section = train_section(trainer, error is None and saver.completed)
    seconds = trainer.stats.seconds
    section.update(tokens=trainer.tokens, tokens_per_s=trainer.tokens / seconds if seconds else 0.0,
                   deltas_step=saver.step, global_step=trainer.global_step)
    if error is not None:
        section["error"] = f"{type(error).__name__}: {error}".splitlines()[0]
    state = program.state.setdefault("report", {})
    state["train"] = section
    state["distributed"] = _distributed_section(trainer, saver, env, fsdp_info, ckpt)
    if staging is None:
        return build_report(compiled)
    compiled.artifacts["deltas.safetensors"] = staging / "deltas.safetensors"
    compiled.artifacts["optimizer.safetensors"] = staging / "optimizer.safetensors"
    return write_outputs(compiled, staging, pass_list)


def _distributed_section(trainer: DistributedTrainer, saver: _Saver, env: DistEnv,
                         fsdp_info: Any, ckpt: Any) -> dict[str, Any]:
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

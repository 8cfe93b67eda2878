"""The process group of a distributed run: joining the job torchrun started (or a
one-process group without it), SIGTERM from torchrun, and leaving the group and the process."""

from __future__ import annotations

import gc
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from ...errors import BadInputError, SparsecError

__all__ = ["DistEnv", "launched_by_torchrun", "setup", "leave_together", "teardown",
           "end_worker", "Terminated", "on_sigterm", "restore_sigterm"]

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


class Terminated(SparsecError):
    """torchrun stopped this worker (another one failed)."""


def on_sigterm() -> Any:
    """torchrun ends the other workers with SIGTERM when one fails: raise, so rank 0 still puts
    the last checkpoint in place. Returns the handler it replaced (None: not the main thread,
    where no handler can be set)."""
    def handler(signum, frame):
        raise Terminated("stopped by SIGTERM (another worker failed?)")
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def restore_sigterm(previous: Any) -> None:
    """Put back the handler `on_sigterm` replaced."""
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)

"""What the ranks of a data-parallel run exchange: the trainable gradients in one flat
all-reduce per dtype, counted by purpose; rank 0's starting state; and the digests that show
the ranks' trained values agree."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..program import Program

__all__ = ["CommCounter", "GradientBucket", "full_ft_bytes", "rank_digest", "gather",
           "broadcast_start"]


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


def gather(obj: Any, world_size: int) -> list[Any]:
    """`obj` from every rank, in rank order."""
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_start(program: Program, comm: CommCounter) -> None:
    """Rank 0's trainable values and sparse indices, bit for bit, on every rank."""
    with torch.no_grad():
        for t in _start_state(program):
            comm.add("setup", t)
            dist.broadcast(t, 0)


def _start_state(program: Program) -> list[torch.Tensor]:
    """Trainable values and sparse indices: what rank 0 broadcasts so all ranks start alike."""
    tensors = [p for _, p in program.trainable_parameters()]
    for rec in program.state.get("sparse_finetune", {}).get("targets", {}).values():
        for part in ("indices", "index"):
            if part in rec["params"]:
                tensors.append(program.get_tensor(rec["params"][part]))
    return tensors

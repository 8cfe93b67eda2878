"""FSDP2 for a traced program: split the flat graph into per-block submodules, then shard them.

A Program's GraphModule is one flat graph: every parameter is a `get_attr` of the root, and no
submodule's `forward` ever runs. FSDP2 (`torch.distributed.fsdp.fully_shard`) gathers a unit's
parameters in that unit's forward hooks, so a flat graph would leave it one unit, the whole
model. `stage_by_blocks` therefore rebuilds the graph as a root that calls one submodule per
contiguous run of a block's nodes (module paths with an index, `layers.3.…`), each owning the
parameters and buffers only it uses; parameters used by more than one stage (tied embeddings)
or by the root's own nodes stay on the root. The staged module computes exactly what the flat
one does (the same nodes in the same order, sharing the same tensors).

`shard_program` then applies `fully_shard` to every stage and to the root, with the trainable
tensors as `ignored_params`: they stay whole on every rank (the trainer all-reduces their
gradients itself), while the frozen base weights are sharded. FSDP2 leaves buffers (the sparse
indices) alone, and sparsec's custom ops see ordinary unsharded tensors inside the units: they
save the gathered weight for backward, which FSDP2 gathers again before the unit's backward.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from .program import Program, module_path, set_attr

__all__ = ["block_key", "stage_by_blocks", "shard_program", "FsdpInfo"]

_SKIP = ("placeholder", "get_attr", "output")


def block_key(path: str) -> str | None:
    """The block a module path lies in (`layers.3` for `layers.3.mlp.up_proj`), or None."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return None


@dataclass(eq=False)  # hashed by identity: two runs of one block are two segments
class _Segment:
    key: str
    nodes: list[fx.Node] = field(default_factory=list)
    attrs: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return "stage_" + self.key.replace(".", "_")


def _segments(gm: fx.GraphModule) -> tuple[list[_Segment], dict[fx.Node, _Segment]]:
    """Maximal runs of consecutive compute nodes of one block (root nodes end a run)."""
    segments: list[_Segment] = []
    seg_of: dict[fx.Node, _Segment] = {}
    current: _Segment | None = None
    for node in gm.graph.nodes:
        if node.op in _SKIP:
            continue
        key = block_key(module_path(node))
        if key is None:
            current = None
            continue
        if current is None or current.key != key:
            current = _Segment(key)
            segments.append(current)
        current.nodes.append(node)
        seg_of[node] = current
    return segments, seg_of


def _assign_attrs(gm: fx.GraphModule, seg_of: dict[fx.Node, _Segment]) -> dict[str, _Segment]:
    """Attributes every use of which lies in one segment move into it; the rest stay on the root."""
    users: dict[str, set] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            users.setdefault(node.target, set()).update(seg_of.get(u) for u in node.users)
    return {t: next(iter(s)) for t, s in users.items() if len(s) == 1 and None not in s}


def _tensor(gm: fx.GraphModule, qualname: str) -> tuple[Any, bool]:
    """(value, is_buffer) of a get_attr target."""
    *parents, leaf = qualname.split(".")
    mod = gm
    for part in parents:
        mod = getattr(mod, part)
    return getattr(mod, leaf), leaf in mod._buffers


def _holder(gm: fx.GraphModule, attrs: list[str], children: dict[str, torch.nn.Module]
            ) -> torch.nn.Module:
    """A plain module with `attrs` (the same tensor objects, buffers as buffers) and children."""
    root = torch.nn.Module()
    for qualname in attrs:
        value, is_buffer = _tensor(gm, qualname)
        set_attr(root, qualname, value, buffer=is_buffer)
    for name, child in children.items():
        root.add_module(name, child)
    return root


def _stage_module(gm: fx.GraphModule, seg: _Segment, owned: set[str]
                  ) -> tuple[fx.GraphModule, list[fx.Node], list[fx.Node]]:
    """The segment as a GraphModule: (module, external inputs in order, outputs in order)."""
    members = set(seg.nodes)
    inputs: list[fx.Node] = []
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}

    def arg(n: fx.Node) -> fx.Node:
        if n in env:
            return env[n]
        if n.op == "get_attr" and n.target in owned:
            env[n] = graph.get_attr(n.target)
        else:
            inputs.append(n)
            env[n] = graph.placeholder(n.name)
        env[n].meta = dict(n.meta)
        return env[n]

    for node in seg.nodes:  # placeholders first: collect the inputs in a first sweep
        for a in node.all_input_nodes:
            if a not in members and not (a.op == "get_attr" and a.target in owned):
                arg(a)
    for node in seg.nodes:
        env[node] = graph.node_copy(node, arg)
    outputs = [n for n in seg.nodes if any(u not in members for u in n.users)]
    graph.output(tuple(env[n] for n in outputs))
    module = fx.GraphModule(_holder(gm, sorted(owned), {}), graph, class_name=seg.name)
    return module, inputs, outputs


def stage_by_blocks(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[str]]:
    """A GraphModule equal to `gm` whose block nodes run inside per-block submodules.

    Returns the staged module and the names of its stage submodules, in call order.
    """
    segments, seg_of = _segments(gm)
    attr_seg = _assign_attrs(gm, seg_of)
    for target, seg in attr_seg.items():
        seg.attrs.append(target)
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen  # the same calling convention (pytree in/out specs)
    env: dict[fx.Node, fx.Node] = {}
    stages: dict[str, torch.nn.Module] = {}
    pending = set(segments)
    root_attrs: list[str] = []
    for node in gm.graph.nodes:
        seg = seg_of.get(node)
        if node.op == "get_attr" and node.target in attr_seg:
            continue
        if seg is None:
            if node.op == "get_attr" and node.target not in root_attrs:
                root_attrs.append(node.target)
            env[node] = graph.node_copy(node, lambda n: env[n])
            continue
        if seg not in pending or node is not seg.nodes[-1]:
            continue  # emit the stage where its last node was: every input exists by then
        pending.discard(seg)
        module, inputs, outputs = _stage_module(gm, seg, set(seg.attrs))
        name = seg.name if seg.name not in stages else f"{seg.name}_{len(stages)}"
        stages[name] = module
        call = graph.call_module(name, tuple(env[n] for n in inputs))
        for i, out in enumerate(outputs):
            env[out] = graph.call_function(operator.getitem, (call, i))
            env[out].meta = dict(out.meta)
    staged = fx.GraphModule(_holder(gm, root_attrs, stages), graph, class_name="StagedGraph")
    staged.graph.lint()
    return staged, list(stages)


# sharding ----------------------------------------------------------------------------------------
@dataclass
class FsdpInfo:
    """What `shard_program` did, for the report."""

    units: list[str]
    sharded_parameters: int
    sharded_bytes: int
    root_bytes: int
    replicated_trainable_bytes: int
    local_shard_bytes: int = 0  # base-weight bytes this rank holds after sharding

    def all_gather_bytes_per_step(self) -> int:
        """Bytes of base weights gathered per step: each stage twice (forward, and again
        before its backward), the root's once (FSDP2 keeps the root unsharded until the end
        of the backward)."""
        return 2 * (self.sharded_bytes - self.root_bytes) + self.root_bytes

    def to_json(self) -> dict[str, Any]:
        return {"units": len(self.units), "unit_names": self.units,
                "sharded_parameters": self.sharded_parameters,
                "sharded_bytes": self.sharded_bytes, "root_unit_bytes": self.root_bytes,
                "replicated_trainable_bytes": self.replicated_trainable_bytes,
                "local_shard_bytes": self.local_shard_bytes,
                "all_gather_bytes_per_step": self.all_gather_bytes_per_step()}


def _move_(tensors: list[torch.Tensor], device: torch.device) -> None:
    """Move tensors in place (same objects), so every holder of them sees the move."""
    for t in tensors:
        if t.device != device:
            t.data = t.data.to(device)


def shard_program(program: Program, device: torch.device, world_size: int
                  ) -> tuple[torch.nn.Module, FsdpInfo]:
    """Stage `program.gm` by blocks and shard its frozen weights with FSDP2 over all ranks.

    The trainable tensors and all buffers move to `device` whole; every frozen parameter is
    sharded, unit by unit. `program.gm` keeps only shape-and-dtype placeholders (on the meta
    device) of the sharded weights, so no rank holds a whole copy of the base on `device`;
    the program can no longer run by itself, only through the returned module.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    gm = program.gm
    staged, units = stage_by_blocks(gm)
    trainable = {p for p in staged.parameters() if p.requires_grad}
    _move_(list(trainable) + list(staged.buffers()), device)
    from .devices import move_constants

    move_constants(staged, device)
    frozen = {n: p for n, p in gm.named_parameters() if not p.requires_grad}
    root_bytes = sum(p.numel() * p.element_size() for name, p in staged.named_parameters()
                     if not p.requires_grad and name.split(".")[0] not in units)
    info = FsdpInfo(units + ["(root)"], sum(p.numel() for p in frozen.values()),
                    sum(p.numel() * p.element_size() for p in frozen.values()), root_bytes,
                    sum(p.numel() * p.element_size() for p in trainable))
    for name, p in frozen.items():  # drop the program's references before sharding
        placeholder = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        set_attr(gm, name, placeholder)
    del frozen
    mesh = init_device_mesh(device.type, (world_size,))
    for name in units:
        fully_shard(getattr(staged, name), mesh=mesh, ignored_params=trainable)
    fully_shard(staged, mesh=mesh, ignored_params=trainable)
    info.local_shard_bytes = sum(p.to_local().numel() * p.element_size()
                                 for p in staged.parameters() if hasattr(p, "to_local"))
    return staged, info

"""Moving a program between devices: its tensors, the constants tracing kept as plain
attributes, and the devices the graph names (tracing records the device it ran on)."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ._util import deepcopy
from .program import Program


def copy_to(program: Program, device: torch.device) -> Program:
    """A copy of `program` on `device`, with its model source's eager module (the onnx backend
    re-traces that one). Each tensor is copied straight to `device`, so the program's own
    device never holds a second set; tensors the graph and the module share stay shared."""
    memo = _tensors_to(device, program.gm, program.source.module)
    source = program.source
    if source.module is not None:
        module = deepcopy(source.module, memo)
        move_constants(module, device)
        source = dataclasses.replace(source, module=module)
    memo[id(program.source)] = source
    for t in pytree.tree_leaves((program.example_inputs, program.state)):
        if isinstance(t, torch.Tensor) and id(t) not in memo:
            memo[id(t)] = t.detach().to(device, copy=True)
    copy = deepcopy(program, memo)
    move_constants(copy.gm, device)
    retarget_graph(copy.gm, device)
    return copy


def _tensors_to(device: torch.device, *modules: torch.nn.Module | None) -> dict[int, Any]:
    """A deepcopy memo sending each parameter and buffer of `modules` to its copy on
    `device`."""
    memo: dict[int, Any] = {}
    for mod in (m for root in modules if root is not None for m in root.modules()):
        for p in mod._parameters.values():
            if p is not None and id(p) not in memo:
                memo[id(p)] = torch.nn.Parameter(p.detach().to(device, copy=True),
                                                 requires_grad=p.requires_grad)
        for b in mod._buffers.values():
            if b is not None and id(b) not in memo:
                memo[id(b)] = b.detach().to(device, copy=True)
    return memo


def retarget_device(program: Program, device: torch.device) -> None:
    """Move the program to `device`: its tensors in place, and the graph's device constants."""
    for t in itertools.chain(program.gm.parameters(), program.gm.buffers()):
        if t.device != device:
            t.data = t.data.to(device)
    move_constants(program.gm, device)
    retarget_graph(program.gm, device)


def move_constants(module: torch.nn.Module, device: torch.device) -> None:
    """Tensors a graph reads that are neither parameters nor buffers (constants tracing kept
    as plain attributes) to `device`."""
    for mod in module.modules():
        for name, value in list(vars(mod).items()):
            if isinstance(value, torch.Tensor) and value.device != device:
                setattr(mod, name, value.to(device))


def retarget_graph(gm: torch.fx.GraphModule, device: torch.device) -> None:
    """Point the device constants that tracing recorded in the graph (the checks of
    `_assert_tensor_metadata`, factory ops' `device=`) at `device`: they name the device the
    model was traced on, and a graph traced on the CPU would refuse CUDA tensors. Nested
    graphs (the bodies of higher-order ops such as an autocast-disabled block) too."""
    def fix(a: Any) -> Any:
        return device if isinstance(a, torch.device) and a != device else a

    for mod in gm.modules():
        if not isinstance(mod, torch.fx.GraphModule):
            continue
        changed = False
        for node in mod.graph.nodes:
            if node.op != "call_function":
                continue
            args = torch.fx.node.map_aggregate(node.args, fix)
            kwargs = torch.fx.node.map_aggregate(node.kwargs, fix)
            if args != node.args or kwargs != node.kwargs:
                node.args, node.kwargs, changed = args, kwargs, True
        if changed:
            mod.recompile()

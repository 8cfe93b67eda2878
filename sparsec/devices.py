"""Moving a program between devices: its tensors, the constants tracing kept as plain
attributes, and the devices the graph names (tracing records the device it ran on)."""

from __future__ import annotations

import itertools
from typing import Any

import torch

from .program import Program


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
    model was traced on, and a graph traced on the CPU would refuse CUDA tensors."""
    def fix(a: Any) -> Any:
        return device if isinstance(a, torch.device) and a != device else a

    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        args = torch.fx.node.map_aggregate(node.args, fix)
        kwargs = torch.fx.node.map_aggregate(node.kwargs, fix)
        if args != node.args or kwargs != node.kwargs:
            node.args, node.kwargs, changed = args, kwargs, True
    if changed:
        gm.recompile()

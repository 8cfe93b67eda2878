"""Memory: predict a graph's peak from its nodes, and measure a real run's peak.

The prediction replays the graph in order the way FX-generated code runs it: every op output
that is not a view or an in-place result is a new allocation of its storage size; a storage is
freed after the last node that reads it (or any view of it), unless it is a parameter, a buffer,
an input or a graph output. Tensors held by `get_attr` and the inputs are resident throughout.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx
from torch.utils import _pytree as pytree

__all__ = ["MemoryPlan", "predict_peak", "predict_timeline", "resident_bytes", "measure_peak", "tensor_bytes", "saved_activations"]


@dataclass
class MemoryPlan:
    resident_bytes: int  # parameters, buffers, optimizer state, inputs
    peak_transient_bytes: int  # the most allocated by the graph itself at one time
    peak_node: str  # the node after which the peak is reached

    @property
    def peak_bytes(self) -> int:
        return self.resident_bytes + self.peak_transient_bytes

    def to_json(self) -> dict[str, Any]:
        return {"predicted_peak_bytes": self.peak_bytes, "resident_bytes": self.resident_bytes,
                "peak_transient_bytes": self.peak_transient_bytes, "peak_node": self.peak_node}


def tensor_bytes(t: Any) -> int:
    if not isinstance(t, torch.Tensor):
        return 0
    try:
        return t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return t.numel() * t.element_size()


def _aliases_input(node: fx.Node) -> bool:
    """Whether the op's (first) output shares storage with an input: views and in-place ops."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.returns:
        return node.target is getattr  # attribute access on a tuple etc.
    return schema.returns[0].alias_info is not None


def resident_bytes(gm: fx.GraphModule) -> int:
    """Bytes of the parameters, buffers and inputs, resident for the whole graph."""
    return _resident(gm)


def _resident(gm: fx.GraphModule) -> int:
    seen: set[int] = set()
    total = 0
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            t = _fetch(gm, node.target)
        elif node.op == "placeholder":
            t = node.meta.get("val")
        else:
            continue
        for leaf in pytree.tree_leaves(t):
            if isinstance(leaf, torch.Tensor):
                key = _storage_key(leaf)
                if key not in seen:
                    seen.add(key)
                    total += tensor_bytes(leaf)
    return total


def _storage_key(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr() or id(t.untyped_storage())
    except (RuntimeError, NotImplementedError):
        return id(t)


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def predict_peak(gm: fx.GraphModule) -> MemoryPlan:
    """Replay `gm` (nodes need `meta["val"]`, as torch.export and make_fx give them)."""
    peak, peak_node = 0, ""
    for name, live in predict_timeline(gm):
        if live > peak:
            peak, peak_node = live, name
    return MemoryPlan(_resident(gm), peak, peak_node)


def predict_timeline(gm: fx.GraphModule) -> list[tuple[str, int]]:
    """(node name, transient bytes live while it runs) for every node, in graph order; add
    `MemoryPlan.resident_bytes` for the total. Its maximum is `predict_peak`'s transient peak."""
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    base: dict[fx.Node, fx.Node] = {}  # node → the node that allocated its storage
    size: dict[fx.Node, int] = {}
    for node in nodes:
        if node.op != "call_function":
            continue
        if _is_getitem(node):
            parent = node.args[0]
            base[node] = base.get(parent, parent) if _aliases_input(parent) else node
            if base[node] is node:
                size[node] = sum(tensor_bytes(v) for v in pytree.tree_leaves(node.meta.get("val")))
        elif _aliases_input(node):
            src = next((a for a in node.all_input_nodes), None)
            base[node] = base.get(src, src) if src is not None else node
        else:
            base[node] = node
            val = node.meta.get("val")
            if not isinstance(val, (tuple, list)):  # tuple outputs are charged to getitems
                size[node] = tensor_bytes(val)
    last_use: dict[fx.Node, int] = {}
    for node in nodes:
        for inp in node.all_input_nodes:
            owner = base.get(inp, inp)
            last_use[owner] = max(last_use.get(owner, 0), pos[node])
            if inp.op == "call_function" and _is_getitem(inp):  # the tuple keeps it alive
                tup = inp.args[0]
                last_use[owner] = max(last_use[owner], _last_user(tup, pos))
    outputs = {base.get(a, a) for a in pytree.tree_leaves(gm.graph.output_node().args)
               if isinstance(a, fx.Node)}
    live = 0
    timeline = []
    frees: dict[int, int] = {}
    for node in nodes:
        if node in size:
            live += size[node]
            end = last_use.get(node, pos[node])
            if node not in outputs and base.get(node, node) is node:
                frees[end] = frees.get(end, 0) + size[node]
        timeline.append((node.name, live))
        live -= frees.pop(pos[node], 0)
    return timeline


def _is_getitem(node: fx.Node) -> bool:
    return getattr(node.target, "__name__", "") == "getitem"


def _last_user(node: fx.Node, pos: dict[fx.Node, int]) -> int:
    return max((pos[u] for u in node.users), default=pos[node])


def saved_activations(gm: fx.GraphModule) -> dict[str, int]:
    """Forward values the backward reads (by node name → bytes), for a tagged step graph."""
    out = {}
    for node in gm.graph.nodes:
        if _role(node) != "forward":
            continue
        if any(_role(u) == "backward" for u in node.users):
            out[node.name] = sum(tensor_bytes(v) for v in pytree.tree_leaves(node.meta.get("val")))
    return out


def _role(node: fx.Node) -> str | None:
    return node.meta.get("sparsec", {}).get("role")


# measuring --------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side prints start/stop lines to fd 2; keep the CLI's stderr clean."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def measure_peak(fn: Callable[[], Any], device: torch.device | str = "cpu",
                 resident_bytes: int = 0) -> int:
    """Peak bytes while `fn()` runs: the CUDA allocator's peak on a GPU; on the CPU the
    profiler's allocation events replayed in time order, plus `resident_bytes` (what was
    already allocated, which the CPU profiler cannot see)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    for e in prof.events():
        amount = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if amount:
            events.append((e.time_range.start, amount))
    live = peak = 0
    for _, amount in sorted(events):
        live += amount
        peak = max(peak, live)
    return resident_bytes + peak

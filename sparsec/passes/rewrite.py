"""Graph surgery shared by rewriting passes: splice a traced torch function into a graph, and
remove the nodes a rewrite left without users.

A replacement is written as an ordinary torch function; `insert_traced` traces it with
`make_fx` (pre-dispatch, so it lands at the same ATen level as `torch.export`'s training IR) on
the fake values of its input nodes and copies the resulting nodes in, with `meta["val"]` set and
the replaced node's module stack, so later passes and backends see a well-formed graph.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Sequence

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch.fx.experimental.proxy_tensor import make_fx

__all__ = ["insert_traced", "erase_unused", "add_constant", "fake_mode_of"]

_CHECK = torch.ops.aten._assert_tensor_metadata.default
_META_KEYS = ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn")
_counter = itertools.count()


def fake_mode_of(gm: fx.GraphModule):
    vals = [n.meta.get("val") for n in gm.graph.nodes if isinstance(n.meta.get("val"),
                                                                       torch.Tensor)]
    mode = detect_fake_mode(vals)
    if mode is None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
    return mode


def add_constant(gm: fx.GraphModule, name: str, value: torch.Tensor, before: fx.Node,
                 *, parameter: bool = False) -> fx.Node:
    """Register `value` as a buffer (or trainable parameter) at `name` and return a get_attr
    node for it (reusing one if the graph already reads `name`), with meta['val'] set."""
    *parents, leaf = name.split(".")
    mod = gm
    for part in parents:
        if not hasattr(mod, part):
            mod.add_module(part, torch.nn.Module())
        mod = getattr(mod, part)
    if not hasattr(mod, leaf):
        if parameter:
            mod.register_parameter(leaf, torch.nn.Parameter(value))
        else:
            mod.register_buffer(leaf, value)
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target == name:
            if _before(n, before):
                return n
    with gm.graph.inserting_before(_first_non_placeholder(gm.graph, before)):
        node = gm.graph.get_attr(name)
    current = gm.get_parameter(name) if parameter else gm.get_buffer(name)
    node.meta["val"] = fake_mode_of(gm).from_tensor(current, static_shapes=True)
    return node


def _before(a: fx.Node, b: fx.Node) -> bool:
    for n in a.graph.nodes:
        if n is a:
            return True
        if n is b:
            return False
    return False


def _first_non_placeholder(graph: fx.Graph, fallback: fx.Node) -> fx.Node:
    for n in graph.nodes:
        if n.op != "placeholder":
            return n
    return fallback


def insert_traced(gm: fx.GraphModule, fn: Callable[..., Any], inputs: Sequence[fx.Node],
                  before: fx.Node, meta_from: fx.Node | None = None,
                  tag: dict[str, Any] | None = None) -> Any:
    """Trace `fn(*values of inputs)` and insert its nodes before `before`.

    Returns the node (or tuple/list of nodes, mirroring fn's output) that holds fn's result.
    Constants fn creates become buffers named `_sparsec_const_N` on `gm`. `tag` is merged into
    every new node's `meta["sparsec"]` (so a pass can tell its own nodes from the model's).
    """
    mode = fake_mode_of(gm)
    fakes = [_fake(n, mode) for n in inputs]
    with mode:
        traced = make_fx(fn, pre_dispatch=True)(*fakes)
    env: dict[fx.Node, Any] = {}
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    for ph, node in zip(placeholders, inputs):
        env[ph] = node
    result: Any = None
    meta = {k: meta_from.meta[k] for k in _META_KEYS if meta_from is not None and
            k in meta_from.meta}
    with gm.graph.inserting_before(before):
        for n in traced.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                result = fx.node.map_arg(n.args[0], lambda x: env[x])
                continue
            if n.op == "get_attr":
                value = getattr(traced, n.target)
                name = f"_sparsec_const_{next(_counter)}"
                env[n] = add_constant(gm, name, value.detach().clone(), before)
                continue
            new = gm.graph.node_copy(n, lambda x: env[x])
            new.meta.update(meta)
            if tag:
                new.meta.setdefault("sparsec", {}).update(tag)
            if "val" in n.meta:
                new.meta["val"] = n.meta["val"]
            env[n] = new
    return result


def _fake(node: fx.Node, mode) -> Any:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val if getattr(val, "fake_mode", None) is mode else \
            mode.from_tensor(val, static_shapes=True)
    raise ValueError(f"node {node.name} has no traced value (meta['val'])")


def erase_unused(graph: fx.Graph, nodes: Sequence[fx.Node]) -> int:
    """Erase `nodes` that have no users (the caller vouches they are safe to drop, e.g. an
    SDPA that fx deems impure for its dropout), then the pure nodes that leaves unused — also
    those whose only users are `_assert_tensor_metadata` checks, which go with them (else a
    dead [L, L] mask stays computed for its check)."""
    removed = 0
    todo = list(nodes)
    chosen = set(nodes)
    seen: set[fx.Node] = set()
    while todo:
        n = todo.pop(0)
        gone = n in seen or getattr(n, "_erased", False) or n.graph is not graph
        if not gone and n.users and all(u.target is _CHECK for u in n.users):
            for check in list(n.users):  # a check of a dead value checks nothing
                graph.erase_node(check)
        if gone or n.users or n.op not in ("call_function", "get_attr"):
            continue
        if n.op == "call_function" and n not in chosen and n.is_impure():
            continue
        seen.add(n)
        inputs = list(n.all_input_nodes)
        graph.erase_node(n)
        removed += 1
        todo.extend(inputs)
    return removed

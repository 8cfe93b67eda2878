"""The Program: the one object that flows from the frontend through every pass to a backend."""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import fx

if TYPE_CHECKING:
    from .joint import JointInfo

__all__ = ["Prop", "PassRecord", "ModelSource", "Program", "module_path", "node_info",
           "set_attr"]


class Prop(StrEnum):
    """Graph properties. Third-party passes may use any other string as a prop."""

    FORWARD_GRAPH = "forward_graph"
    JOINT_GRAPH = "joint_graph"
    SPARSE_PARAMETERS = "sparse_parameters"
    BLOCK_SPARSE_ATTENTION = "block_sparse_attention"
    BACKWARD_PRUNED = "backward_pruned"


@dataclass
class PassRecord:
    """What one pass did to the program."""

    name: str
    options: dict[str, Any]
    modified: bool
    stats: dict[str, Any]
    ms: float
    verify: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"name": self.name, "options": self.options, "modified": self.modified,
               "stats": self.stats, "ms": round(self.ms, 3)}
        if self.verify is not None:
            out["verify"] = self.verify
        return out


@dataclass
class ModelSource:
    """Where a model came from, and the training hooks its `model.py` may define."""

    name: str
    path: str | None = None
    loss: Callable[[Any, Any], torch.Tensor] | None = None
    batches: Callable[[], Any] | None = None
    # The eager module that was traced: the onnx backend re-traces it with dynamic shapes.
    module: torch.nn.Module | None = field(default=None, repr=False, compare=False)


@dataclass
class Program:
    """A traced model and everything passes know about it.

    `gm` is an ATen-level GraphModule; its parameters and buffers (the sparse state that passes
    add included) are registered on it and reached by `get_attr`, so they serialize, become ONNX
    initializers and reach kernels as arguments. `joint` describes a training-step program (its
    forward graph, trainable tensors, optimizer); `state` holds the rest of the per-pass-family
    data keyed by the family's name (for example the targets a sparse fine-tuning pass chose).
    """

    gm: fx.GraphModule
    example_inputs: tuple
    props: set[str] = field(default_factory=lambda: {Prop.FORWARD_GRAPH})
    history: list[PassRecord] = field(default_factory=list)
    source: ModelSource = field(default_factory=lambda: ModelSource(name="model"))
    state: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    joint: JointInfo | None = None  # set by joint-graph: this program is a training step

    @property
    def is_training_step(self) -> bool:
        """Whether `gm` is a training step (forward, backward, optimizer) rather than a model."""
        return self.joint is not None

    def __post_init__(self) -> None:
        if not self.fingerprint:
            self.fingerprint = fingerprint(self.gm)

    # running -----------------------------------------------------------------------------
    def __call__(self, *inputs: Any) -> Any:
        return self.gm(*inputs)

    def run_checked(self, *inputs: Any) -> Any:
        """What verification compares: the outputs; for a training-step program, the loss and
        the gradient of every trainable parameter (recovered from the optimizer's update, see
        `sparsec.optim.implied_gradient`). State the step writes is restored afterwards, so
        checking never trains the model."""
        joint = self.joint
        if joint is None:
            with torch.no_grad():
                return _detached(self.gm(*inputs))
        out, effects = self.step_effects(*inputs)
        return out, effects["gradients"]

    def step_effects(self, *inputs: Any) -> tuple[Any, dict[str, dict[str, torch.Tensor]]]:
        """Run one step of a training-step program and undo it: (outputs, {"gradients": …,
        "updates": …}) by trainable parameter name. Where the optimizer keeps no record of
        the gradient (plain SGD) "gradients" holds the parameter after the step instead."""
        from .optim import implied_gradient

        joint = self.joint
        names = joint.mutable()
        before = {n: self.get_tensor(n).detach().clone() for n in names}
        with self.preserving_state():
            out = _detached(self.gm(*inputs))
            after = {n: self.get_tensor(n).detach().clone() for n in names}
        grads, updates = {}, {}
        for n in joint.trainable:
            keys = joint.state_names.get(n, {})
            g = implied_gradient(joint.optimizer, before[n],
                                 {k: before[a] for k, a in keys.items()},
                                 {k: after[a] for k, a in keys.items()}, after[n])
            updates[n] = after[n] - before[n]
            grads[n] = g if g is not None else after[n]
        return out, {"gradients": grads, "updates": updates}

    @contextlib.contextmanager
    def preserving_state(self) -> Iterator[None]:
        """Restore every tensor a training step writes (parameters, optimizer state) on exit."""
        joint = self.joint
        names = joint.mutable() if joint is not None else []
        saved = {n: self.get_tensor(n).detach().clone() for n in names}
        try:
            yield
        finally:
            with torch.no_grad():
                for n, t in saved.items():
                    self.get_tensor(n).copy_(t)

    def forward_module(self) -> fx.GraphModule:
        """The inference graph: `gm` for a forward program, the forward graph of a step."""
        joint = self.joint
        return joint.forward if joint is not None else self.gm

    def forward_program(self) -> "Program":
        """This program for inference: itself, or for a training-step program the forward
        graph it keeps (sharing parameters, so it sees every step taken) as a forward program
        with the same history, source and pass state."""
        joint = self.joint
        if joint is None:
            return self
        state = dict(self.state)
        props = (self.props - {Prop.JOINT_GRAPH, Prop.BACKWARD_PRUNED}) | {Prop.FORWARD_GRAPH}
        return Program(gm=joint.forward, example_inputs=self.example_inputs[:joint.n_model_inputs],
                       props=props, history=list(self.history), source=self.source, state=state)

    def copy(self, *, share_tensors: bool = False) -> "Program":
        """A deep copy (graph, parameters, state); the model source is shared. With
        `share_tensors` the copy's parameters and buffers are this program's own tensors (a
        reference graph rewritten beside the program, at no extra parameter memory):
        attributes registered on the copy stay on the copy, but an in-place change to a
        shared tensor shows in both."""
        import itertools

        from ._util import deepcopy

        memo = {id(self.source): self.source}
        if share_tensors:
            for t in itertools.chain(self.gm.parameters(), self.gm.buffers()):
                memo[id(t)] = t
        return deepcopy(self, memo)

    # parameters --------------------------------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        total = trainable = 0
        for p in self.gm.parameters():
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        return {"total": total, "trainable": trainable}

    def trainable_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return ((n, p) for n, p in self.gm.named_parameters() if p.requires_grad)

    def add_parameter(self, qualname: str, value: torch.Tensor, *, trainable: bool,
                      before: fx.Node) -> fx.Node:
        """Register `value` on the GraphModule under `qualname` and return a `get_attr` node."""
        param = torch.nn.Parameter(value, requires_grad=trainable)
        set_attr(self.gm, qualname, param)
        with self.gm.graph.inserting_before(before):
            return self.gm.graph.get_attr(qualname)

    def add_buffer(self, qualname: str, value: torch.Tensor, *, before: fx.Node) -> fx.Node:
        set_attr(self.gm, qualname, value, buffer=True)
        with self.gm.graph.inserting_before(before):
            return self.gm.graph.get_attr(qualname)

    def get_tensor(self, qualname: str) -> torch.Tensor:
        return self.gm.get_parameter(qualname) if _is_param(self.gm, qualname) \
            else self.gm.get_buffer(qualname)

    # graph helpers -----------------------------------------------------------------------
    def call_nodes(self, *targets: Any) -> list[fx.Node]:
        """`call_function` nodes, optionally only those whose target is one of `targets`."""
        return [n for n in self.gm.graph.nodes if n.op == "call_function"
                and (not targets or n.target in targets)]

    def summary(self) -> dict[str, Any]:
        return {"props": sorted(self.props), "params": self.param_counts(),
                "nodes": len(self.gm.graph.nodes), "passes": [r.name for r in self.history]}


def _detached(out: Any) -> Any:
    from torch.utils import _pytree as pytree

    return pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, out)


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost module a node was traced in ('' for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def node_info(node: fx.Node) -> dict[str, Any]:
    """sparsec's per-node annotations (`node.meta["sparsec"]`), created on first use."""
    return node.meta.setdefault("sparsec", {})


def fingerprint(module: torch.nn.Module) -> str:
    """A stable hash of parameter and buffer names, shapes, dtypes and their full content.

    Used to refuse artifacts (sparse deltas) made for a different base model. Every byte
    counts (a sample would miss a base that differs in one weight); sha256 reads about a
    gigabyte per second, small next to tracing.
    """
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict(keep_vars=False).items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()[:16]


def _is_param(module: torch.nn.Module, qualname: str) -> bool:
    try:
        module.get_parameter(qualname)
        return True
    except AttributeError:
        return False


def set_attr(root: torch.nn.Module, qualname: str, value: Any, buffer: bool = False) -> None:
    """Put `value` at the dotted `qualname` under `root`, creating empty parent modules: a
    parameter is registered as one, a tensor with `buffer` as a buffer, anything else set as
    a plain attribute (a later `get_attr` node reads it)."""
    *parents, leaf = qualname.split(".")
    mod = root
    for part in parents:
        if not hasattr(mod, part):
            mod.add_module(part, torch.nn.Module())
        mod = getattr(mod, part)
    if buffer:
        mod.register_buffer(leaf, value)
    elif isinstance(value, torch.nn.Parameter):
        mod.register_parameter(leaf, value)
    else:
        setattr(mod, leaf, value)

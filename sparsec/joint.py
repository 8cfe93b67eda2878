"""Stage 2: the whole training step — forward, loss, backward, optimizer update — as one graph.

`build_joint_step` traces the step ahead of time through AOTAutograd (`aot_export_module` with
`trace_joint=True`) and appends the optimizer update (sparsec.optim, traced with `make_fx`).
Parameters, buffers and optimizer state are `get_attr`s on the step module and are updated in
place, so calling the step module with a batch runs one training step and returns the loss.

The step is traced as *full* fine-tuning would compute it: every parameter gets a gradient,
and only trainable ones are updated. The joint-graph passes then cut what sparse training does
not need (`prune-backward` and friends), each verified against the step before it.

Node roles live in `node.meta["sparsec"]["role"]`: "forward" (what the loss needs),
"backward", or "optimizer" (with `param`, the parameter the update writes).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx.traceback as fx_traceback
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx

from ._util import first_line, quiet
from .errors import BadInputError
from .optim import OptimizerConfig, init_state, torch_optimizer, update_
from .program import Program, node_info, set_attr

__all__ = ["JointInfo", "TrainStep", "build_joint_step", "eager_step", "example_batch",
           "state_name", "step_report"]


@dataclass
class JointInfo:
    """What `program.joint` holds for a training-step program."""

    forward: fx.GraphModule  # the forward graph, sharing parameters with the step
    trainable: list[str]  # parameter names the step updates
    optimizer: OptimizerConfig
    state_names: dict[str, dict[str, str]] = field(default_factory=dict)  # param → key → attr
    n_model_inputs: int = 1
    untrained: list[str] = field(default_factory=list)  # trainable, but the loss never reaches
    traced_on: str = "fake tensors"  # or "real tensors (why)": a real trace runs the step once

    def mutable(self) -> list[str]:
        """Every tensor one step writes: trainable parameters, their state, the step count."""
        names = list(self.trainable)
        for keys in self.state_names.values():
            names.extend(keys.values())
        return names + ["optim.step"]


def state_name(param: str, key: str) -> str:
    return f"optim.{param.replace('.', '_')}.{key}"


def example_batch(program: Program) -> tuple:
    """The first training batch from model.py's batches(), else the example inputs."""
    if program.source.batches is not None:
        try:
            return tuple(next(iter(program.source.batches())))
        except StopIteration:
            raise BadInputError("batches() yielded nothing; yield at least one batch") from None
    return tuple(program.example_inputs)


class _LossModule(torch.nn.Module):
    def __init__(self, gm: fx.GraphModule, loss: Callable, n_inputs: int):
        super().__init__()
        self.gm, self.loss_fn, self.n_inputs = gm, loss, n_inputs

    def forward(self, *batch: Any) -> tuple[torch.Tensor]:
        return (self.loss_fn(self.gm(*batch[:self.n_inputs]), batch),)


def build_joint_step(program: Program, config: OptimizerConfig) -> tuple[fx.GraphModule,
                                                                           JointInfo, tuple]:
    """Trace the training step of `program` (a forward program). Returns the step module,
    its JointInfo and the example batch it was traced with."""
    if program.source.loss is None:
        raise BadInputError("the joint graph needs a loss: define loss(output, batch) in model.py")
    forward = program.gm
    trainable = [n for n, p in forward.named_parameters() if p.requires_grad]
    if not trainable:
        raise BadInputError("nothing is trainable: run sparse-finetune or freeze:trainable=[...] "
                            "before joint-graph")
    batch = example_batch(program)
    n_inputs = len(program.example_inputs)
    reached = reached_parameters(forward, program.source.loss, n_inputs, batch)
    untrained = [n for n in trainable if n not in reached]
    trainable = [n for n in trainable if n in reached]
    if not trainable:
        raise BadInputError(f"the loss reaches none of the trainable parameters "
                            f"({_names(untrained)}); make loss(output, batch) depend on them "
                            "or train other parameters")
    joint, sig, traced_on = _export_joint(forward, program.source.loss, n_inputs, batch,
                                          reached)
    info = JointInfo(forward=forward, trainable=trainable, optimizer=config,
                     n_model_inputs=n_inputs, untrained=untrained, traced_on=traced_on)
    step_gm = _with_optimizer(forward, joint, sig, info, batch)
    _tag_roles(step_gm)
    return step_gm, info, batch


def _names(names: list[str], most: int = 4) -> str:
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def reached_parameters(forward: fx.GraphModule, loss: Callable, n_inputs: int,
                       batch: tuple) -> set[str]:
    """Names of the parameters the loss depends on (a pooler that the loss never reads, say,
    is not among them). Found from the autograd graph of one forward under fake tensors, so
    it costs no memory; a loss that cannot run on fake tensors runs for real."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    params = dict(forward.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(True)
        try:
            with quiet(), torch.enable_grad(), \
                    FakeTensorMode(allow_non_fake_inputs=True) as mode:
                fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t
                        for t in batch]
                value = loss(forward(*fake[:n_inputs]), tuple(fake))
        except Exception:
            with quiet(), torch.enable_grad():
                value = loss(forward(*batch[:n_inputs]), batch)
    except Exception:
        return set(params)  # the export below reports the loss's own error
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
    leaves = _autograd_leaves(value)
    return {n for n, p in params.items() if id(p) in leaves}


def _autograd_leaves(value: Any) -> set[int]:
    fn = value.grad_fn if isinstance(value, torch.Tensor) else None
    seen, stack, leaves = set(), [fn], set()
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        var = getattr(f, "variable", None)
        if var is not None:
            leaves.add(id(var))
        stack.extend(g for g, _ in f.next_functions)
    return leaves


def _export_joint(forward: fx.GraphModule, loss: Callable, n_inputs: int, batch: tuple,
                  reached: set[str]):
    from torch._functorch.aot_autograd import aot_export_module

    params = dict(forward.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    try:
        for n, p in params.items():  # the full step: every parameter the loss reaches
            p.requires_grad_(n in reached)
        module = _LossModule(forward, loss, n_inputs)
        with quiet():
            try:
                return (*_export_on_fakes(module, batch), "fake tensors")
            except Exception as e:  # a loss or op fake tensors cannot trace: trace for real
                why = f"{type(e).__name__}: {first_line(e)[:120]}"
                return (*aot_export_module(module, batch, trace_joint=True,
                                           output_loss_index=0), f"real tensors ({why})")
    except BadInputError:
        raise
    except Exception as e:
        raise BadInputError(f"cannot trace the training step: {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]}; check loss(output, batch)") from e
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])


def _export_on_fakes(module: torch.nn.Module, batch: tuple):
    """aot_export_module over fake parameters, buffers and batch. Given real tensors it runs
    the step while tracing it — a whole full-fine-tuning step, with its time and its memory
    (every weight's gradient, every activation) — which a sparse step may not fit in."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch._functorch.aot_autograd import aot_export_module
    from torch.nn.utils.stateless import _reparametrize_module

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    state = {n: mode.from_tensor(t) for n, t in [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False)]}
    fakes = tuple(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in batch)
    with _reparametrize_module(module, state):
        joint, sig = aot_export_module(module, fakes, trace_joint=True, output_loss_index=0)
    held = [n.target for n in joint.graph.nodes if n.op == "get_attr"
            and isinstance(getattr(joint, n.target, None), FakeTensor)]
    if held:  # a constant made while tracing has no values: trace for real instead
        raise RuntimeError(f"fake constants {held}")
    return joint, sig


def _with_optimizer(forward: fx.GraphModule, joint: fx.GraphModule, sig, info: JointInfo,
                    batch: tuple) -> fx.GraphModule:
    strip = lambda n: n[len("gm."):] if n.startswith("gm.") else n  # noqa: E731
    param_names = [strip(n) for n in sig.parameters]
    buffer_names = [strip(n) for n in sig.buffers]
    params = [forward.get_parameter(n) for n in param_names]
    buffers = [forward.get_buffer(n) for n in buffer_names]
    out_names = [a.name if isinstance(a, fx.Node) else None
                 for a in joint.graph.output_node().args[0]]
    grad_at = {strip(p): out_names.index(o)
               for o, p in sig.backward_signature.gradients_to_parameters.items()}
    loss_at = out_names.index(sig.user_outputs[0])
    mutated = {out_names.index(o): strip(b) for o, b in sig.buffers_to_mutate.items()}
    _tag_gradients(joint, out_names, grad_at)
    states = {n: init_state(forward.get_parameter(n), info.optimizer) for n in info.trainable}
    info.state_names = {n: {k: state_name(n, k) for k in st} for n, st in states.items()}
    # float64, like the Python floats torch.optim computes bias corrections with: 1 - 0.999 in
    # float32 is off by 1.3e-5, which would show in every update
    step = torch.zeros((), dtype=torch.float64, device=params[0].device if params else "cpu")
    flat_states = [t for n in info.trainable for t in states[n].values()]
    n_p, n_b, n_s = len(params), len(buffers), len(flat_states)

    def full_step(*flat: torch.Tensor) -> tuple[torch.Tensor]:
        ps, bs = flat[:n_p], flat[n_p:n_p + n_b]
        sts, step_t, user = flat[n_p + n_b:n_p + n_b + n_s], flat[n_p + n_b + n_s], \
            flat[n_p + n_b + n_s + 1:]
        outs = fx.Interpreter(joint).run(*ps, *bs, *user)  # carries node tags over
        with fx_traceback.annotate({"role": "optimizer", "param": "optim.step"}):
            step_t.add_(1)
        it = iter(sts)
        for name in info.trainable:
            state = {k: next(it) for k in states[name]}
            with fx_traceback.annotate({"role": "optimizer", "param": name}):
                update_(ps[param_names.index(name)], outs[grad_at[name]], state, step_t,
                        info.optimizer)
        for i, name in mutated.items():
            with fx_traceback.annotate({"role": "buffer_update", "param": name}):
                bs[buffer_names.index(name)].copy_(outs[i])
        return (outs[loss_at],)

    flat = [*params, *buffers, *flat_states, step, *batch]
    with fx_traceback.preserve_node_meta(), quiet():
        traced = make_fx(full_step, tracing_mode="fake")(*[_plain(t) for t in flat])
    attr_names = param_names + buffer_names + [
        state_name(n, k) for n in info.trainable for k in states[n]] + ["optim.step"]
    values = params + buffers + flat_states + [step]
    return _lift_to_attrs(traced, attr_names, values)


def _tag_gradients(joint: fx.GraphModule, out_names: list, grad_at: dict[str, int]) -> None:
    """Mark the node producing each parameter's gradient, so passes can name what they cut."""
    outputs = joint.graph.output_node().args[0]
    for param, index in grad_at.items():
        node = outputs[index]
        if isinstance(node, fx.Node) and node.op == "call_function":
            node.meta["custom"] = {"role": "backward", "grad_of": param}


def _plain(t: Any) -> Any:
    return t.detach() if isinstance(t, torch.Tensor) else t


def _lift_to_attrs(traced: fx.GraphModule, names: list[str], values: list[torch.Tensor]
                   ) -> fx.GraphModule:
    """Turn the first len(names) placeholders into get_attrs of a root holding `values`."""
    root = torch.nn.Module()
    for name, value in zip(names, values):
        set_attr(root, name, value, buffer=not isinstance(value, torch.nn.Parameter))
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    graph = traced.graph
    for node, name in zip(placeholders, names):
        with graph.inserting_before(node), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the attribute lives on `root`, not yet on graph
            attr = graph.get_attr(name)
        attr.meta.update(node.meta)
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
    for i, node in enumerate(n for n in graph.nodes if n.op == "placeholder"):
        node.name = node.target = f"batch_{i}"
    step = TrainStep(root, graph, class_name="TrainStep")
    step.graph.lint()
    return step


class TrainStep(fx.GraphModule):
    """A traced training step. It holds its own backward, so it always runs without autograd
    recording (which would also refuse its in-place parameter updates)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return super().__call__(*args, **kwargs)


def _tag_roles(gm: fx.GraphModule) -> None:
    """Tag nodes forward / backward / optimizer (see the module docstring)."""
    loss = gm.graph.output_node().args[0][0]
    forward = _ancestors(loss)
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        custom = node.meta.get("custom") or {}
        info = node_info(node)
        if custom.get("role") == "optimizer":
            info["role"], info["param"] = "optimizer", custom.get("param")
        else:
            info["role"] = "forward" if node in forward else "backward"
        if custom.get("grad_of"):
            info["grad_of"] = custom["grad_of"]


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


# the eager reference ---------------------------------------------------------------------------
def eager_step(forward: fx.GraphModule, loss: Callable, n_inputs: int, batch: tuple,
               config: OptimizerConfig, trainable: list[str]
               ) -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]]]:
    """One eager training step on a copy of `forward`: (loss, {"gradients": …, "updates": …}
    by trainable parameter name)."""
    from ._util import deepcopy

    gm = deepcopy(forward)
    params = dict(gm.named_parameters())
    for n, p in params.items():
        p.requires_grad_(n in trainable)
        p.grad = None
    before = {n: params[n].detach().clone() for n in trainable}
    opt = torch_optimizer([params[n] for n in trainable], config)
    with torch.enable_grad():  # verification runs references under no_grad
        value = loss(gm(*batch[:n_inputs]), batch)
        value.backward()
    grads = {n: params[n].grad.detach().clone() if params[n].grad is not None
             else torch.zeros_like(params[n]) for n in trainable}
    opt.step()
    updates = {n: params[n].detach() - before[n] for n in trainable}
    if config.name == "sgd" and not config.momentum:  # as Program.step_effects records it
        grads = {n: params[n].detach().clone() for n in trainable}
    return value.detach(), {"gradients": grads, "updates": updates}


# the report of a step program -------------------------------------------------------------------
def step_report(program: Program) -> dict[str, Any]:
    """Predicted vs measured peak memory of one step, the eager full fine-tuning peak on the
    same model and batch, and the updates checked against one eager sparse step."""
    from .memory import measure_peak, predict_peak
    from .compare import compare_outputs

    info: JointInfo = program.joint
    batch = program.example_inputs
    plan = predict_peak(program.gm)
    device = next((t.device for t in program.gm.parameters()), torch.device("cpu"))
    with program.preserving_state():
        measured = measure_peak(lambda: program.gm(*batch), device, plan.resident_bytes)
    full_ft = _eager_full_ft_peak(info, program.source.loss, batch, device)
    eager_loss, eager = eager_step(info.forward, program.source.loss, info.n_model_inputs,
                                   batch, info.optimizer, info.trainable)
    out, effects = program.step_effects(*batch)
    check = {"loss": compare_outputs(out, (eager_loss,)),
             "gradients": compare_outputs(effects["gradients"], eager["gradients"]),
             "updates": compare_outputs(effects["updates"], eager["updates"])}
    return {"memory": {**plan.to_json(), "measured_peak_bytes": measured,
                       "eager_full_ft_peak_bytes": full_ft,
                       "measured_vs_full_ft": round(measured / full_ft, 4) if full_ft else None},
            "grad_check": {**check["gradients"], "loss": check["loss"],
                           "updates": check["updates"],
                           "compared": "the gradient of every trainable parameter (top level), "
                                       "the loss and the optimizer's updates",
                           "reference": "one eager step of the sparse model (torch.optim)"}}


def _eager_full_ft_peak(info: JointInfo, loss: Callable, batch: tuple,
                        device: torch.device) -> int:
    """Peak of the second eager step (optimizer state exists) with every weight trainable."""
    from ._util import deepcopy
    from .memory import measure_peak, tensor_bytes

    gm = deepcopy(info.forward)
    params = list(gm.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch_optimizer(params, info.optimizer)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss(gm(*batch[:info.n_model_inputs]), batch).backward()
        opt.step()

    step()
    opt.zero_grad(set_to_none=True)
    resident = sum(tensor_bytes(t) for t in [*gm.parameters(), *gm.buffers()])
    resident += sum(tensor_bytes(v) for st in opt.state.values() for v in st.values())
    resident += sum(tensor_bytes(t) for t in batch)
    return measure_peak(step, device, resident)

"""Load a `model.py` and trace a model to a Program through `torch.export` (training IR).

A `model.py` defines `model()` (an `nn.Module`) and `example_inputs()` (a tuple of inputs), and
for training optionally `loss(output, batch)` and `batches()`. A batch is a tuple whose first
`len(example_inputs())` items are the model's inputs; `loss` sees the whole batch, so targets
can ride along after the inputs. `model.py` is executed as Python code: only load files you
trust.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

import torch
from torch.utils import _pytree as pytree

from ._util import first_line, quiet
from .errors import BadInputError, TraceError
from .passes.canonicalize import causal_attention, matmuls_to_linear
from .program import ModelSource, Program

__all__ = ["ModelFile", "load_model_file", "trace", "trace_file", "tracing_model",
           "tie_aliases"]


@dataclass
class ModelFile:
    """The hooks of a loaded `model.py`."""

    path: Path
    module: ModuleType
    model: Callable[[], torch.nn.Module]
    example_inputs: Callable[[], Any]
    loss: Callable[[Any, Any], torch.Tensor] | None
    batches: Callable[[], Any] | None

    def build(self) -> tuple[torch.nn.Module, tuple]:
        """Call `model()` and `example_inputs()`, checking what they return."""
        where = self.path.name
        model = _call_hook(self.model, where, "model")
        if not isinstance(model, torch.nn.Module):
            raise BadInputError(f"{where}: model() returned {type(model).__name__}, not a "
                                "torch.nn.Module; return the module instance")
        inputs = _call_hook(self.example_inputs, where, "example_inputs")
        return model, normalize_inputs(inputs, f"{where}: example_inputs()")


def load_model_file(path: str | Path) -> ModelFile:
    """Import a `model.py` (it is executed) and return its hooks, with one-line errors."""
    p = Path(path)
    if not p.exists():
        raise BadInputError(f"{p}: no such file; give the path of a model.py that defines "
                            "model() and example_inputs()")
    if p.is_dir():
        raise BadInputError(f"{p}: is a directory; give the path of a model.py file")
    if not p.is_file():  # a device or FIFO (/dev/zero) would be read forever
        raise BadInputError(f"{p}: is not a regular file; give the path of a model.py file")
    try:
        source = p.read_bytes()
    except OSError as e:
        raise BadInputError(f"{p}: cannot read it ({e.strerror}); check its permissions") from e
    module = _import(p, source)
    hooks = {n: getattr(module, n, None) for n in ("model", "example_inputs", "loss", "batches")}
    for required in ("model", "example_inputs"):
        if not callable(hooks[required]):
            raise BadInputError(f"{p.name}: defines no {required}() function; add "
                                f"`def {required}(): ...` (see examples/tiny_llama.py)")
    return ModelFile(p, module, hooks["model"], hooks["example_inputs"], hooks["loss"],
                     hooks["batches"])


def _import(path: Path, source: bytes) -> ModuleType:
    name = f"sparsec_user_model_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise BadInputError(f"{path}: not a Python file; give a model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        code = compile(source, str(path), "exec")
        exec(code, module.__dict__)
    except SyntaxError as e:
        raise BadInputError(f"{path.name}:{e.lineno}: syntax error: {e.msg}") from e
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        raise BadInputError(f"{_user_line(e, path)}importing {path.name} raised "
                            f"{type(e).__name__}: {first_line(e)}") from e
    return module


def _call_hook(fn: Callable[[], Any], where: str, name: str) -> Any:
    try:
        return fn()
    except Exception as e:
        raise BadInputError(f"{_user_line(e, None)}{name}() in {where} raised "
                            f"{type(e).__name__}: {first_line(e)}") from e


def normalize_inputs(inputs: Any, where: str) -> tuple:
    """Inputs as a tuple; tensors (or nested lists/dicts of them) and Python scalars only."""
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)):
        raise BadInputError(f"{where} returned {type(inputs).__name__}; return a tuple of "
                            "tensors, e.g. `return (tokens,)`")
    for leaf in pytree.tree_leaves(tuple(inputs)):
        if not isinstance(leaf, (torch.Tensor, int, float, bool, type(None))):
            raise BadInputError(f"{where} contains a {type(leaf).__name__}; inputs must be "
                                "tensors (or nested tuples/dicts of tensors)")
    if not any(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(tuple(inputs))):
        raise BadInputError(f"{where} has no tensor; return at least one input tensor")
    return tuple(inputs)


# tracing ------------------------------------------------------------------------------------
def trace(model: torch.nn.Module, example_inputs: Any, *, source: ModelSource | None = None,
          check: bool = True) -> Program:
    """Trace `model` (put in eval mode) with `torch.export` into a Program.

    The forward graph keeps `aten.linear` and `aten.scaled_dot_product_attention` whole, and
    each node's `nn_module_stack` names the module it came from. With `check`, the traced graph
    is run once and compared with the eager model.
    """
    if not isinstance(model, torch.nn.Module):
        raise BadInputError(f"trace() takes a torch.nn.Module, got {type(model).__name__}")
    inputs = normalize_inputs(example_inputs, "example_inputs")
    model.eval()
    with tracing_model(model) as notes:
        ep = _export(model, inputs, source.path if source else None)
        gm = ep.module()
        _drop_guards(gm)
        tied = tie_aliases(gm)
        transposed = matmuls_to_linear(gm)
        causal = causal_attention(gm)
        source = source or ModelSource(name=type(model).__name__)
        source.module = model
        program = Program(gm=gm, example_inputs=inputs, source=source)
        if check:
            _check_trace(model, program)
    if tied:
        notes.append("tied parameters trained once: " +
                     ", ".join(f"{a} = {c}" for a, c in tied.items()))
    if transposed:
        notes.append(f"{len(transposed)} weights stored [in, out] (as GPT-2's Conv1D) are "
                     "held transposed, as linear layers")
        program.state["transposed_weights"] = transposed
    if causal:
        notes.append(f"{len(causal)} attention sites with a constant causal mask run as "
                     "causal attention (is_causal=True, mask dropped)")
    if notes:
        program.state.setdefault("report", {})["trace"] = {
            "notes": notes, "tied": tied, "transposed": transposed, "causal": causal}
    return program


@contextlib.contextmanager
def tracing_model(model: torch.nn.Module) -> Iterator[list[str]]:
    """Put a model in the state sparsec traces it in, and restore it afterwards.

    Hugging Face decoders default to `use_cache=True` and then return a KV cache object,
    which is no tensor output and which training and prefill do not need: caching is turned
    off while tracing (and while re-tracing for ONNX). Yields notes for the report.
    """
    configs = {id(c): c for c in _configs(model)}.values()
    cached = [c for c in configs if getattr(c, "use_cache", False) is True]
    notes = []
    if cached:
        notes.append("traced with use_cache=False (a KV cache is no training or prefill "
                     "output)")
    try:
        for c in cached:
            c.use_cache = False
        yield notes
    finally:
        for c in cached:
            c.use_cache = True


def _configs(model: torch.nn.Module) -> list[Any]:
    """The Hugging Face configs (objects with `use_cache`) of `model` and its submodules."""
    out = []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "use_cache"):
            out.append(cfg)
        for sub in ("text_config", "decoder"):
            inner = getattr(cfg, sub, None) if cfg is not None else None
            if inner is not None and hasattr(inner, "use_cache") and not callable(inner):
                out.append(inner)
    return out


def tie_aliases(gm: torch.fx.GraphModule) -> dict[str, str]:
    """Give each parameter registered under several names (tied embeddings, T5's `shared`)
    one name: the graph reads it through the first, the other registrations go. Returns
    {alias: kept name}. One name means one gradient and one optimizer state, as eager
    training has for a tied weight."""
    first: dict[int, str] = {}
    alias: dict[str, str] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        if id(p) in first:
            alias[name] = first[id(p)]
        else:
            first[id(p)] = name
    if not alias:
        return {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in alias:
            node.target = alias[node.target]
    for name in alias:
        *parents, leaf = name.split(".")
        owner = gm.get_submodule(".".join(parents)) if parents else gm
        delattr(owner, leaf)
    gm.recompile()
    return alias


def trace_file(path: str | Path) -> Program:
    """Load a `model.py` and trace its `model()` on its `example_inputs()`."""
    mf = load_model_file(path)
    model, inputs = mf.build()
    source = ModelSource(name=mf.path.stem, path=str(mf.path), loss=mf.loss, batches=mf.batches)
    return trace(model, inputs, source=source)


def _export(model: torch.nn.Module, inputs: tuple,
            path: str | None) -> torch.export.ExportedProgram:
    try:
        with quiet():
            return torch.export.export(model, inputs, strict=False)
    except Exception as e:
        raise _trace_error(e, path) from e


_DATA_DEPENDENT = ("GuardOnDataDependentSymNode", "DataDependentOutputException",
                   "PendingUnbackedSymbolNotFound")


def _trace_error(e: BaseException, path: str | None) -> TraceError:
    where = _user_line(e, Path(path) if path else None, with_code=True)
    kind = type(e).__name__
    if kind in _DATA_DEPENDENT or "data-dependent" in str(e):
        what = ("data-dependent control flow (a Python branch or shape that depends on a "
                "tensor's values); use torch.where/torch.cond or move it out of forward()")
    elif "Unsupported" in kind or "UserError" in kind:
        what = f"an unsupported construct: {first_line(e)}"
    else:
        what = f"the model raised {kind}: {first_line(e)}"
    return TraceError(f"{where}cannot trace the model: {what}")


def _user_line(e: BaseException, path: Path | None, with_code: bool = False) -> str:
    """'file:line: ' of the deepest frame in user code (the model file if given), or ''."""
    frames = traceback.extract_tb(e.__traceback__)
    frames += _frames_from_message(str(e))
    user = [f for f in frames if _is_user_frame(f.filename, path)]
    if not user:
        return ""
    f = user[-1]
    code = f" `{f.line.strip()}`" if with_code and f.line else ""
    return f"{Path(f.filename).name}:{f.lineno}:{code} "


def _frames_from_message(msg: str) -> list[traceback.FrameSummary]:
    """torch.export reports the user's frame in its message ('File "x.py", line 7, in f')."""
    import re

    out = []
    lines = msg.splitlines()
    for i, line in enumerate(lines):
        m = re.search(r'File "([^"]+)", line (\d+), in (\S+)', line)
        if m:
            code = lines[i + 1].strip() if i + 1 < len(lines) else None
            out.append(traceback.FrameSummary(m[1], int(m[2]), m[3], line=code))
    return out


def _is_user_frame(filename: str, path: Path | None) -> bool:
    if path is not None:
        try:
            return Path(filename).resolve() == path.resolve()
        except OSError:
            return False
    lib_markers = ("site-packages", "dist-packages", "/lib/python", "<frozen", "/sparsec/")
    return not any(m in filename for m in lib_markers)


def _drop_guards(gm: torch.fx.GraphModule) -> None:
    """Remove the input-shape guard module torch.export ≥ 2.12 inserts; sparsec checks shapes."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm.recompile()


def _check_trace(model: torch.nn.Module, program: Program) -> None:
    from .compare import compare_outputs, tolerance

    with torch.no_grad():
        expected = model(*program.example_inputs)
        got = program.gm(*program.example_inputs)
    err = compare_outputs(got, expected)
    if not err["max_rel_err"] <= tolerance(got, 1e-5):
        raise TraceError(f"the traced graph does not reproduce the model (max relative error "
                         f"{err['max_rel_err']:.3g}); the model may depend on Python state "
                         "that torch.export cannot see")
    program.state["trace_check"] = err

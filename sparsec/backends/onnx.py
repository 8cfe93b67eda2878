"""The onnx backend: export with `torch.onnx.export(dynamo=True)`, check parity in onnxruntime.

sparsec ops export through the onnxscript translations registered in `sparsec.ops`:
block-sparse attention as gathered blocks in standard ONNX ops (or the dense masked form, or
onnxruntime's `com.microsoft.SparseAttention`, by option), the dynamic selection ops as their
ONNX equivalents; sparse fine-tuning ops are merged into dense weights first. The exported
model is run on the example inputs and compared with the PyTorch program, and where batch or
sequence are dynamic, once more at a second shape; parity beyond the dtype's tolerance is an
error (the CLI exits 1). Options (`LowerOptions.extra`, CLI `--opset`, `--onnx-*`):

- `opset`: the default-domain opset (default: torch.onnx's);
- `attention`: "auto" (gathered; the contrib op where `provider` is "cuda" and it can run),
  "gathered", "dense" or "contrib" (wherever the op itself can express the site);
- `provider`: "cpu" or "cuda": where the model is meant to run (and parity is checked, if
  onnxruntime offers it here);
- `dynamic`: "auto" (batch, and sequence when no layout fixes it), "batch" or "none".
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from .._util import first_line, quiet
from ..errors import BadInputError, ParityError, SparsecError
from ..ops import onnx_translations
from ..passes.merge_sparse import merged_for_export
from ..pipeline import compare_outputs
from ..program import Program, node_info
from .base import Compiled, LowerOptions
from .onnx_dynamic import DynamicPlan, plan_dynamic, second_shape
from .onnx_model import dynamic_axes, locate_nm, nm_weights, run_checker, write_metadata

__all__ = ["lower", "export_onnx", "OnnxRunner", "OnnxOptions", "PARITY_TOL"]

# Relative parity tolerance by the program's lowest output precision.
PARITY_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2, torch.float64: 1e-8}

_CHOICES = {"attention": ("auto", "gathered", "dense", "contrib"), "provider": ("cpu", "cuda"),
            "dynamic": ("auto", "batch", "none")}


@dataclass(frozen=True)
class OnnxOptions:
    """The onnx backend's options (see the module docstring)."""

    opset: int | None = None
    attention: str = "auto"
    provider: str = "cpu"
    dynamic: str = "auto"

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> "OnnxOptions":
        known = {f.name for f in fields(cls)}
        for key, value in extra.items():
            if key not in known:
                raise BadInputError(f"unknown onnx backend option '{key}'; choose from "
                                    f"{', '.join(sorted(known))}")
            if key in _CHOICES and value not in _CHOICES[key]:
                raise BadInputError(f"onnx backend option {key} = {value!r}; choose one of "
                                    f"{', '.join(_CHOICES[key])}")
        opset = extra.get("opset")
        if opset is not None and (not isinstance(opset, int) or not 18 <= opset <= 23):
            raise BadInputError(f"opset {opset!r} is not supported; choose 18 to 23")
        return cls(**{k: v for k, v in extra.items() if v is not None})


def lower(program: Program, options: LowerOptions | None = None) -> Compiled:
    options = options or LowerOptions()
    opts = OnnxOptions.from_extra(options.extra)
    program = program.forward_program()  # a training step deploys its forward graph
    source, notes = _on_cpu(program)
    tmp = None if options.out_dir else tempfile.TemporaryDirectory(prefix="sparsec-onnx-")
    out_dir = Path(options.out_dir or tmp.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    nm = nm_weights(program)
    # Sparse fine-tuning ops deploy merged into dense weights: the base architecture, no extras.
    deployed, merged = merged_for_export(source)
    plan = plan_dynamic(deployed, source, opts.dynamic)
    onx, sites = _export(plan, opts)
    section: dict[str, Any] = {"file": path.name}
    notes += plan.notes
    section.update(_describe(onx, plan, deployed, sites, nm, opts, notes))
    if merged:
        section["merged_sparse_ops"] = merged
    _save(onx, path)
    contrib = any(s["form"] == "contrib" for s in sites)
    section["checker"] = run_checker(path)
    runner, where = _runner(path, opts, contrib, options.verify, notes)
    section["parity_on"] = where if options.verify else "none (--no-verify)"
    if options.verify:
        section.update(_parity(source, runner))
        if plan.dynamic:
            section["second_shape"] = _second_parity(plan, runner, section["rtol"])
    compiled = Compiled(program=program, backend="onnx", fn=runner, report={"onnx": section},
                        artifacts=_artifacts(path), notes=_dedupe(notes))
    compiled.keepalive = tmp  # the temporary directory lives as long as the Compiled
    return compiled


def _on_cpu(program: Program) -> tuple[Program, list[str]]:
    """The program to export from: itself on the CPU, else a CPU copy (an ONNX file names no
    device, and torch.onnx and onnxruntime's CPU build both want CPU tensors)."""
    tensors = list(program.gm.parameters()) + list(program.gm.buffers()) + [
        t for t in pytree.tree_leaves(program.example_inputs) if isinstance(t, torch.Tensor)]
    devices = {t.device for t in tensors if t.device.type != "cpu"}
    if not devices:
        return program, []
    from ..devices import copy_to

    where = ", ".join(sorted(str(d) for d in devices))
    return copy_to(program, torch.device("cpu")), [
        f"exported from a CPU copy of the program on {where}"]


def _export(plan: DynamicPlan, opts: OnnxOptions):
    from ..ops.onnx_common import ExportContext, export_context

    ctx = ExportContext(attention=opts.attention, provider=opts.provider,
                        hints=_attention_hints(plan.program))
    with export_context(ctx):
        onx = export_onnx(plan.program, opset=opts.opset, dynamic_shapes=plan.dynamic_shapes)
    return onx, ctx.sites


def _attention_hints(program: Program) -> list[dict[str, Any]]:
    """Per attention op (graph order): whether its static layout leaves every query row some
    key (then the translation needs no empty-row Where: a few % of the attention time)."""
    from torch import fx

    from ..layouts.block_layout import BlockLayout

    hints: list[dict[str, Any]] = []
    for n in program.gm.graph.nodes:
        if n.target is not torch.ops.sparsec.block_sparse_attention.default:
            continue
        parts = n.args[3:7]
        if n.args[7] is not None or not all(isinstance(a, fx.Node) and a.op == "get_attr"
                                            for a in parts):
            hints.append({})  # an element mask or a computed layout: rows may be empty
            continue
        q_len, kv_len = (int(a.meta["val"].shape[-2]) for a in n.args[:2])
        layout = BlockLayout(*(program.get_tensor(a.target) for a in parts), q_len, kv_len,
                             n.args[10], n.args[11], n.args[9])
        hints.append({"rows_never_empty": bool(layout.to_element_mask().any(-1).all())})
    return hints


def export_onnx(program: Program, path: Path | None = None, *, opset: int | None = None,
                dynamic_shapes: Any = None):
    """Export the program with sparsec's translations; save it to `path` if given. Returns
    torch's ONNXProgram."""
    kwargs: dict[str, Any] = {"dynamo": True, "custom_translation_table": onnx_translations()}
    if opset is not None:
        kwargs["opset_version"] = opset
    if dynamic_shapes is not None:
        kwargs["dynamic_shapes"] = dynamic_shapes
    from .onnx_names import output_names

    names = output_names(program)
    if names:
        kwargs["output_names"] = names
    try:
        with quiet():
            onx = torch.onnx.export(program.gm, program.example_inputs, **kwargs)
    except Exception as e:
        raise SparsecError(f"ONNX export failed: {type(e).__name__}: {first_line(e)}") from e
    if path is not None:
        _save(onx, path)
    return onx


def _save(onx, path: Path) -> None:
    try:
        with quiet():
            onx.save(str(path))
    except OSError as e:
        raise BadInputError(f"{path}: cannot write the ONNX model ({e.strerror or e})") from e


def _opset(onx) -> int:
    return onx.model.opset_imports.get("", 0)


def _describe(onx, plan: DynamicPlan, deployed: Program, sites: list[dict[str, Any]],
              nm: list[dict[str, Any]], opts: OnnxOptions, notes: list[str]) -> dict[str, Any]:
    """The report section's facts, also written into the model's metadata_props."""
    from .._version import __version__

    attention = _name_sites(plan.program, sites)
    for s in attention:
        if "note" in s:
            notes.append(s["note"])
    axes = dynamic_axes(onx.model)
    out: dict[str, Any] = {"opset": _opset(onx), "dynamic_axes": axes,
                           "static_axes": list(plan.notes),
                           "attention": {"option": opts.attention, "provider": opts.provider,
                                         "sites": attention}}
    meta: dict[str, Any] = {"version": __version__, "dynamic_axes": axes}
    if attention:
        meta["attention"] = attention
    if nm:
        out["nm"] = locate_nm(onx.model, deployed, nm)
        meta["nm"] = out["nm"]
        bad = [e["weight"] for e in out["nm"] if not e["pattern_holds"]]
        if bad:
            raise SparsecError(f"the exported N:M weights lost their pattern: {', '.join(bad)}")
    write_metadata(onx.model, meta)
    return out


def _name_sites(program: Program, sites: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The translations' records, with each site's module and layout (same graph order)."""
    ops = [n for n in program.gm.graph.nodes
           if n.target is torch.ops.sparsec.block_sparse_attention.default]
    if len(ops) != len(sites):
        return sites
    out = []
    for node, site in zip(ops, sites):
        meta = node_info(node).get("attention", {})
        out.append({"module": meta.get("site"), "layout": meta.get("layout"), **site})
    return out


def _runner(path: Path, opts: OnnxOptions, contrib: bool, verify: bool,
            notes: list[str]) -> tuple["OnnxRunner", str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if opts.provider == "cuda" and "CUDAExecutionProvider" in available:
        return _load(path, ["CUDAExecutionProvider", "CPUExecutionProvider"], verify,
                     notes), "cuda"
    if contrib:
        msg = ("the model uses com.microsoft.SparseAttention, which runs on onnxruntime's CUDA "
               "execution provider only (this onnxruntime has "
               f"{', '.join(p.replace('ExecutionProvider', '') for p in available)})")
        if verify:
            raise BadInputError(f"{msg}; install onnxruntime-gpu to check parity, or pass "
                                "--no-verify")
        notes.append(f"{msg}: parity not checked")
        return _Unrunnable(path, msg), "none"
    if opts.provider == "cuda":
        notes.append("onnxruntime has no CUDA execution provider here: parity checked on the CPU")
    return _load(path, ["CPUExecutionProvider"], verify, notes), "cpu"


def _load(path: Path, providers: list[str], verify: bool, notes: list[str]):
    """An OnnxRunner, or a clear error where onnxruntime cannot load the model (e.g. a dtype
    its CPU kernels lack); without verification, a note and a runner that says why."""
    try:
        return OnnxRunner(path, providers)
    except Exception as e:  # onnxruntime raises its own pybind exception types
        msg = f"onnxruntime cannot load {path.name}: {first_line(e)}"
        if not verify:
            notes.append(f"{msg}: parity not checked")
            return _Unrunnable(path, msg)
        if "implementation" in str(e).lower():
            raise BadInputError(f"{msg}; export in float32 or float16 (onnxruntime has few "
                                "bfloat16 kernels), or pass --no-verify to write the model "
                                "unchecked") from None
        raise SparsecError(msg) from None


class OnnxRunner:
    """Run an exported model in onnxruntime with torch tensors in and out."""

    def __init__(self, path: Path, providers: list[str] | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), providers=providers or
                                            ["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *inputs: Any) -> list[torch.Tensor]:
        leaves = [t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
        if len(leaves) != len(self.input_names):
            raise SparsecError(f"the ONNX model takes {len(self.input_names)} tensors, "
                               f"got {len(leaves)}")
        feed = {n: _to_numpy(t) for n, t in zip(self.input_names, leaves)}
        device = leaves[0].device if leaves else torch.device("cpu")  # outputs where inputs are
        return [torch.from_numpy(np.asarray(o)).to(device) for o in self.session.run(None, feed)]


class _Unrunnable:
    """Stands in for a runner where onnxruntime cannot run the model (says why when called)."""

    def __init__(self, path: Path, why: str):
        self.path, self.why = Path(path), why

    def __call__(self, *inputs: Any) -> Any:
        raise SparsecError(f"cannot run {self.path.name} here: {self.why}")


def _tolerance(outputs: list[torch.Tensor]) -> float:
    dtype = min((t.dtype for t in outputs if t.is_floating_point()),
                key=lambda d: torch.finfo(d).bits, default=torch.float32)
    return PARITY_TOL.get(dtype, 1e-4)


def _compare(fn, runner, inputs: tuple) -> tuple[dict[str, float], float]:
    with torch.no_grad():
        expected = fn(*inputs)
    want = [t for t in pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
    got = runner(*inputs)
    return compare_outputs(got, want), _tolerance(want)


def _parity(program: Program, runner: OnnxRunner) -> dict[str, Any]:
    err, tol = _compare(program.gm, runner, program.example_inputs)
    result = {"max_abs_err": err["max_abs_err"], "max_rel_err": err["max_rel_err"], "rtol": tol}
    if not err["max_rel_err"] <= tol:
        raise ParityError(f"onnxruntime output differs from PyTorch: max relative error "
                          f"{err['max_rel_err']:.3g} > {tol:g} (max abs {err['max_abs_err']:.3g})")
    return result


def _second_parity(plan: DynamicPlan, runner: OnnxRunner, tol: float) -> dict[str, Any]:
    """ONNX vs the re-built PyTorch program at other sizes of the dynamic axes."""
    inputs = second_shape(plan)
    err, _ = _compare(plan.program.gm, runner, inputs)
    shapes = [list(t.shape) for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    if not err["max_rel_err"] <= tol:
        raise ParityError(f"onnxruntime output differs from PyTorch at input shapes {shapes}: "
                          f"max relative error {err['max_rel_err']:.3g} > {tol:g}")
    return {"input_shapes": shapes, "max_abs_err": err["max_abs_err"],
            "max_rel_err": err["max_rel_err"]}


def _artifacts(path: Path) -> dict[str, Path]:
    artifacts = {"model.onnx": path}
    data = path.with_name(path.name + ".data")
    if data.exists():
        artifacts[data.name] = data
    return artifacts


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        raise SparsecError("onnxruntime cannot take bfloat16 inputs from numpy; "
                           "trace the model in float32 or float16 for the onnx backend")
    return t.contiguous().numpy()

"""The onnx backend: export with `torch.onnx.export(dynamo=True)`, check parity in onnxruntime.

sparsec ops export through the onnxscript translations registered in `sparsec.ops`. The
exported model is run on the example inputs and compared with the PyTorch program; parity
beyond the dtype's tolerance is an error (the CLI exits 1).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from .._util import first_line, quiet
from ..errors import ParityError, SparsecError
from ..ops import onnx_translations
from ..passes.merge_sparse import merged_for_export
from ..pipeline import compare_outputs
from ..program import Program
from .base import Compiled, LowerOptions

__all__ = ["lower", "export_onnx", "OnnxRunner", "PARITY_TOL"]

# Relative parity tolerance by the program's lowest output precision.
PARITY_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2, torch.float64: 1e-8}


def lower(program: Program, options: LowerOptions | None = None) -> Compiled:
    options = options or LowerOptions()
    tmp = None if options.out_dir else tempfile.TemporaryDirectory(prefix="sparsec-onnx-")
    out_dir = Path(options.out_dir or tmp.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    # Sparse fine-tuning ops deploy merged into dense weights: the base architecture, no extras.
    exported, merged = merged_for_export(program)
    opset = export_onnx(exported, path, opset=options.extra.get("opset"))
    runner = OnnxRunner(path)
    section: dict[str, Any] = {"file": path.name, "opset": opset}
    if merged:
        section["merged_sparse_ops"] = merged
    if options.verify:
        section.update(_parity(program, runner))
    artifacts = {"model.onnx": path}
    data = path.with_name(path.name + ".data")
    if data.exists():
        artifacts[data.name] = data
    compiled = Compiled(program=program, backend="onnx", fn=runner, report={"onnx": section},
                        artifacts=artifacts)
    compiled.keepalive = tmp  # the temporary directory lives as long as the Compiled
    return compiled


def export_onnx(program: Program, path: Path, *, opset: int | None = None) -> int:
    """Export the program to `path`; return the default-domain opset written."""
    kwargs: dict[str, Any] = {"dynamo": True, "custom_translation_table": onnx_translations()}
    if opset is not None:
        kwargs["opset_version"] = opset
    try:
        with quiet():
            onx = torch.onnx.export(program.gm, program.example_inputs, **kwargs)
            onx.save(str(path))
    except Exception as e:
        raise SparsecError(f"ONNX export failed: {type(e).__name__}: {first_line(e)}") from e
    return next((o.version for o in onx.model_proto.opset_import if o.domain in ("", "ai.onnx")),
                0)


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
        return [torch.from_numpy(np.asarray(o)) for o in self.session.run(None, feed)]


def _parity(program: Program, runner: OnnxRunner) -> dict[str, Any]:
    with torch.no_grad():
        expected = program.gm(*program.example_inputs)
    want = [t for t in pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
    got = runner(*program.example_inputs)
    err = compare_outputs(got, want)
    dtype = min((t.dtype for t in want if t.is_floating_point()),
                key=lambda d: torch.finfo(d).bits, default=torch.float32)
    tol = PARITY_TOL.get(dtype, 1e-4)
    result = {"max_abs_err": err["max_abs_err"], "max_rel_err": err["max_rel_err"], "rtol": tol}
    if not err["max_rel_err"] <= tol:
        raise ParityError(f"onnxruntime output differs from PyTorch: max relative error "
                          f"{err['max_rel_err']:.3g} > {tol:g} (max abs {err['max_abs_err']:.3g})")
    return result


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        raise SparsecError("onnxruntime cannot take bfloat16 inputs from numpy; "
                           "trace the model in float32 or float16 for the onnx backend")
    return t.contiguous().numpy()

"""What the onnx backend writes into and checks on an exported model: the N:M weights
(recorded in metadata_props and checked in the initializers), sparsec's metadata, the dynamic
axes, and the ONNX checker."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .._util import first_line
from ..errors import SparsecError
from ..program import Program

__all__ = ["nm_weights", "locate_nm", "write_metadata", "dynamic_axes", "run_checker",
           "METADATA_PREFIX"]

METADATA_PREFIX = "sparsec."


def nm_weights(program: Program) -> list[dict[str, Any]]:
    """The weights an `nm` sparse fine-tuning op computes with: name, n, m (before merging)."""
    from ..passes.sparse_finetune import FINETUNE_OPS, finetune_nodes

    out = []
    for node in finetune_nodes(program):
        if FINETUNE_OPS[node.target] == "nm":
            out.append({"weight": node.args[1].target, "n": int(node.args[3]),
                        "m": int(node.args[4])})
    return out


def _holds_nm(w: np.ndarray, n: int, m: int, axis: int) -> bool:
    """Every group of m consecutive entries along `axis` has at most n non-zeros."""
    w = np.moveaxis(w, axis, -1)
    if w.shape[-1] % m:
        return False
    groups = w.reshape(*w.shape[:-1], w.shape[-1] // m, m)
    return bool(((groups != 0).sum(-1) <= n).all())


def locate_nm(ir_model: Any, deployed: Program, entries: list[dict[str, Any]]
              ) -> list[dict[str, Any]]:
    """Find each N:M weight among the model's initializers (the exporter may store it
    transposed under a generated name) and check the pattern there."""
    inits = {name: v.const_value.numpy() for name, v in ir_model.graph.initializers.items()
             if v.const_value is not None}
    out = []
    for e in entries:
        w = deployed.get_tensor(e["weight"]).detach().cpu().numpy()
        found = None
        for name, arr in inits.items():
            if arr.shape == w.shape and np.array_equal(arr, w):
                found = (name, 1)  # [out, in]: groups run along axis 1
            elif arr.shape == w.shape[::-1] and np.array_equal(arr, w.T):
                found = (name, 0)
            if found:
                break
        row = {**e, "initializer": found[0] if found else None,
               "group_axis": found[1] if found else None}
        row["pattern_holds"] = bool(found) and _holds_nm(inits[found[0]], e["n"], e["m"],
                                                         found[1])
        out.append(row)
    return out


def write_metadata(ir_model: Any, values: dict[str, Any]) -> None:
    """sparsec's facts as metadata_props (JSON strings under `sparsec.`)."""
    for key, value in values.items():
        ir_model.metadata_props[METADATA_PREFIX + key] = \
            value if isinstance(value, str) else json.dumps(value)


def dynamic_axes(ir_model: Any) -> dict[str, dict[str, str]]:
    """{input name: {dim index: symbolic name}} as the exported model declares them."""
    out: dict[str, dict[str, str]] = {}
    for value in ir_model.graph.inputs:
        dims = {str(i): str(d) for i, d in enumerate(value.shape or ())
                if not isinstance(d, int) and d is not None}
        if dims:
            out[value.name] = dims
    return out


def run_checker(path: Path) -> str:
    """Run `onnx.checker.check_model` (full_check where it works); return what ran."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
        return "full"
    except Exception as e:  # fall back to the structural check, and say why
        reason = first_line(e)
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as e:
        raise SparsecError(f"the ONNX checker rejects the exported model: {first_line(e)}") \
            from e
    return f"basic (full_check failed: {reason})"

"""Names of the ONNX graph's outputs, after the model's outputs.

A transformers ModelOutput (or any dict) gives its keys (`logits`, `last_hidden_state`); an
HF checkpoint directory's task gives its output's name; tuples number their items
(`output_0`, …, or `<key>_<i>` inside a named output); a lone unnamed tensor is `output`.
"""

from __future__ import annotations

from typing import Any

from ..program import Program

__all__ = ["output_names"]


def output_names(program: Program) -> list[str] | None:
    """One name per flattened output, or None when the graph carries no output structure."""
    spec = getattr(getattr(program.gm.graph._codegen, "pytree_info", None), "out_spec", None)
    if spec is None:
        return None
    root = _root_name(program)
    names: list[str] = []
    _walk(spec, root, names, top=True)
    if len(set(names)) != len(names):  # never give the exporter clashing names
        return None
    return names


def _root_name(program: Program) -> str:
    from ..hf_source import OUTPUT_NAMES

    task = getattr(program.source.module, "task", None)
    return OUTPUT_NAMES.get(task, "output") if isinstance(task, str) else "output"


def _walk(spec: Any, prefix: str, names: list[str], top: bool = False) -> None:
    if spec.is_leaf():
        names.append(prefix)
        return
    keys = spec.context if isinstance(spec.context, (list, tuple)) else None
    children = list(spec.children())
    for i, child in enumerate(children):
        if keys is not None and len(keys) == len(children) and isinstance(keys[i], str):
            name = keys[i] if top else f"{prefix}.{keys[i]}"
        else:
            name = f"{prefix}_{i}"
        _walk(child, name, names)

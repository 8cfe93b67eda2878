"""The triton backend: the program's sparsec ops on their Triton kernels, on a CUDA GPU.

The GraphModule runs as it is; its sparsec ops (block-sparse attention and its backward, block
selection, sampled weight gradients, N:M masks) dispatch to the kernels in `sparsec.kernels`.
The dense parts run eager, or through `torch.compile` with the backend option
`compile=True` (the sparsec ops stay opaque calls inside the compiled graph).

With verification on, the kernels' outputs are compared with the same program run on the
PyTorch references (`sparsec.kernels.references_only`) on the example inputs; a difference
beyond the dtype's tolerance is a ParityError. Where the kernels cannot run (no CUDA tensors,
no Triton) the program runs on the references and report.json says why:
report["triton"] = {"device", "kernels", "fallback", "dense"}.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..errors import ParityError
from ..program import Program
from .base import Compiled, LowerOptions

__all__ = ["lower", "sparsec_ops", "program_device"]


def sparsec_ops(program: Program) -> list[str]:
    """Names of the sparsec ops the program's graphs call, in graph order."""
    names: list[str] = []
    modules = [program.gm]
    if program.forward_module() is not program.gm:
        modules.append(program.forward_module())
    for gm in modules:
        for node in gm.graph.nodes:
            target = str(node.target) if node.op == "call_function" else ""
            if target.startswith("sparsec."):
                name = target.split(".")[1]
                if name not in names:
                    names.append(name)
    return names


def program_device(program: Program) -> torch.device:
    """Where the program's tensors live: the example inputs', else the parameters'."""
    for t in pytree.tree_leaves(program.example_inputs):
        if isinstance(t, torch.Tensor):
            return t.device
    for t in program.gm.parameters():
        return t.device
    return torch.device("cpu")


def _fallback_reason(device: torch.device) -> str | None:
    from ..kernels._triton import HAS_TRITON

    if not HAS_TRITON:
        return "triton is not installed"
    if device.type != "cuda":
        return (f"the program's tensors are on {device.type}; the Triton kernels need a CUDA "
                "device")
    return None


def lower(program: Program, options: LowerOptions | None = None) -> Compiled:
    from ..kernels import kernels_for, load_kernels

    options = options or LowerOptions()
    device = program_device(program)
    ops = sparsec_ops(program)
    section: dict[str, Any] = {"device": str(device), "kernels": [], "fallback": None,
                               "dense": "eager", "ops": ops}
    compiled = Compiled(program=program, backend="triton", fn=program.gm,
                        report={"triton": section})
    reason = _fallback_reason(device)
    if reason is not None:
        section["fallback"] = reason
        compiled.notes.append(f"triton backend: {reason}; the program runs on the PyTorch "
                              "reference implementations of the sparsec ops")
    else:
        load_kernels()
        section["kernels"] = kernels_for(ops)
        if options.extra.get("compile"):
            compiled.fn = torch.compile(program.gm)
            section["dense"] = "torch.compile"
        if options.verify and ops:
            section["parity"] = _parity(program, compiled)
    if program.is_training_step and options.verify:
        from ..joint import step_report

        compiled.report.update(step_report(program))
    return compiled


def _parity(program: Program, compiled: Compiled) -> dict[str, float]:
    """Kernels against references on the example inputs (state a step writes is restored)."""
    from ..kernels import references_only
    from ..pipeline import compare_outputs, tolerance

    inputs = program.example_inputs
    with program.preserving_state(), torch.no_grad():
        got = _detach(compiled.fn(*inputs))
    with references_only(), program.preserving_state(), torch.no_grad():
        want = _detach(program.gm(*inputs))
    err = compare_outputs(got, want)
    tol = tolerance(want, 1e-4)
    result = {**err, "rtol": tol}
    if not err["max_rel_err"] <= tol:
        raise ParityError(f"Triton kernels differ from the PyTorch references: max relative "
                          f"error {err['max_rel_err']:.3g} > {tol:g}")
    return result


def _detach(x: Any) -> Any:
    return pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t,
                           x)

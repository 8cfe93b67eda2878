"""The model zoo's feature matrix: one zoo entry through one sparsec feature, as a cell.

    from sparsec.testing import zoo, zoo_matrix

    m = zoo_matrix.MatrixModel(zoo.get("llama"), zoo_matrix.MatrixConfig())
    info = zoo_matrix.run_cell(m, "joint")      # raises AssertionError when the cell fails

The features and what each cell checks are in docs/zoo.md; `tests/zoo` runs the matrix on the
CPU and `tools/gpu_zoo.py` on a GPU.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .zoo import ZooEntry, ZooModel

__all__ = ["FEATURES", "MatrixConfig", "MatrixModel", "run_cell"]


FEATURES = ("trace", "onnx", "delta", "structured", "nm", "train", "attention", "joint",
            "deploy")


@dataclass
class MatrixConfig:
    """Sizes and backends for `run_cell`: tiny float32 on the CPU by default."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    seq: int = 32
    batch: int = 2
    width: int = 64
    layers: int = 2
    heads: int = 4
    backend: str = "eager"          # "triton" on a GPU: sparsec ops on their kernels
    block: int = 16                 # block-sparse attention block (tokens)
    train_steps: int = 10
    onnx_seq: int | None = None     # ONNX cells' length (default: seq); they run in float32
    workdir: str | None = None      # where output directories go (default: a temp dir)


class MatrixModel:
    """One zoo entry under one MatrixConfig: the built model and the traced program, made once
    and shared by every cell (each cell's passes run on a copy)."""

    def __init__(self, entry: ZooEntry, config: MatrixConfig):
        import tempfile

        self.entry, self.config = entry, config
        self._tmp = None if config.workdir else tempfile.TemporaryDirectory(prefix="sparsec-zoo-")
        self.workdir = config.workdir or self._tmp.name
        self._cache: dict[str, Any] = {}

    def _key(self, onnx: bool) -> tuple:
        c = self.config
        if onnx:  # ONNX cells run in float32 (and at onnx_seq, where it is set)
            return torch.float32, c.onnx_seq or c.seq
        return c.dtype, c.seq

    def built(self, *, onnx: bool = False) -> ZooModel:
        """The built model (for ONNX cells: in float32 at onnx_seq), made once."""
        key = ("built",) + self._key(onnx)
        if key not in self._cache:
            c = self.config
            dtype, seq = self._key(onnx)
            self._cache[key] = self.entry.build(c.device, dtype, seq, c.batch, width=c.width,
                                                layers=c.layers, heads=c.heads)
        return self._cache[key]

    def program(self, *, onnx: bool = False):
        """The traced program of `built(onnx=onnx)`, made once (passes run on copies)."""
        key = ("program",) + self._key(onnx)
        if key not in self._cache:
            self._cache[key] = self.built(onnx=onnx).trace()
        return self._cache[key]

    def out(self, name: str) -> str:
        return os.path.join(self.workdir, f"{self.entry.name}-{name}")

    def trained(self):
        """10 eager training steps of a 10% sparse delta (cached: deploy reuses it)."""
        if "trained" not in self._cache:
            from ..training import train_model

            run = train_model(self.program(onnx=True), steps=self.config.train_steps,
                              passes=(FINETUNE_FOR_TRAINING,), lr=1e-2,
                              out_dir=self.out("train"), force=True)
            self._cache["trained"] = run
        return self._cache["trained"]


FINETUNE_FOR_TRAINING = "sparse-finetune:method=delta,density=0.1"
_FINETUNE = {"delta": "sparse-finetune:method=delta,density=0.05",
             "structured": "sparse-finetune:method=structured,density=0.05,select=norm",
             "nm": "sparse-finetune:method=nm,n=2,m=4"}


def run_cell(m: MatrixModel, feature: str) -> dict[str, Any]:
    """Run one feature on one model; returns what it measured, raises on any failure."""
    if feature not in FEATURES:
        raise ValueError(f"no feature {feature!r}; choose one of {', '.join(FEATURES)}")
    return _CELLS[feature](m)


def _tol(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 3e-2


def _eager(model: nn.Module, inputs: tuple) -> Any:
    with torch.no_grad():
        return model(*inputs)


def _leaves(out: Any) -> list[torch.Tensor]:
    from torch.utils import _pytree as pytree

    if isinstance(out, dict):  # ModelOutput: its tensors in order (what the program returns)
        out = tuple(v for v in out.values() if v is not None)
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _main(out: Any) -> torch.Tensor:
    """The model's main output tensor (logits or last hidden state)."""
    if isinstance(out, dict):
        for key in ("logits", "last_hidden_state"):
            if key in out:
                return out[key]
    return _leaves(out)[0]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        raise AssertionError(f"output shape {tuple(got.shape)} != eager {tuple(want.shape)}")
    if not torch.isfinite(got).eq(torch.isfinite(want)).all():
        return math.inf
    ok = torch.isfinite(want)
    diff = (got[ok] - want[ok]).abs().max() if ok.any() else torch.tensor(0.0)
    return float(diff) / max(float(want[ok].abs().max()) if ok.any() else 0.0, 1e-12)


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)


def _cell_trace(m: MatrixModel) -> dict[str, Any]:
    from .. import compile as compile_
    from ..passes.base import get_pass
    from .check import check_pass

    program = m.program()
    zm = m.built()
    got = _main(program.gm(*zm.example_inputs))
    err = _rel(got, _main(_eager(zm.model, zm.example_inputs)))
    _check(err <= _tol(m.config.dtype), f"traced graph differs from eager: rel err {err:.3g}")
    check_pass(get_pass("dead-code")(), program)
    compiled = compile_(program, backend=m.config.backend)
    return {"rel_err": err, "nodes": len(program.gm.graph.nodes),
            "verify": compiled.program.state.get("verify", {}).get("max_rel_err")}


def _second_inputs(m: MatrixModel, zm: ZooModel) -> tuple:
    return zm.inputs(batch=m.config.batch + 1, seed=7)


def _cell_onnx(m: MatrixModel) -> dict[str, Any]:
    from .. import compile as compile_

    zm, program = m.built(onnx=True), m.program(onnx=True)
    compiled = compile_(program, backend="onnx", out_dir=m.out("onnx"), force=True)
    inputs = _second_inputs(m, zm)
    got = compiled(*inputs)[0]
    err = _rel(got, _main(_eager(zm.model, inputs)))
    _check(err <= 1e-4, f"onnxruntime at batch {m.config.batch + 1} differs from eager: "
                        f"rel err {err:.3g} (dynamic batch)")
    return {"rel_err_second_batch": err, "dynamic_axes": compiled.report["onnx"]["dynamic_axes"]}


def _expected_targets(model: nn.Module) -> list[str]:
    """Weight matrices a sparse fine-tuning pass should target: every Linear/Conv1D inside
    the blocks (a module path with an index), except weights registered twice (tied)."""
    kinds: tuple[type, ...] = (nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D

        kinds += (Conv1D,)
    except ImportError:
        pass
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return [name for name, mod in model.named_modules() if isinstance(mod, kinds)
            and any(part.isdigit() for part in name.split(".")) and seen[id(mod.weight)] == 1]


def _finetune_cell(method: str):
    def cell(m: MatrixModel) -> dict[str, Any]:
        from .. import compile as compile_
        from ..passes.sparse_finetune import finetune_nodes

        compiled = compile_(m.program(), passes=[_FINETUNE[method]], backend=m.config.backend)
        got = len(finetune_nodes(compiled.program))
        want = _expected_targets(m.built().model)
        _check(got == len(want), f"{got} sparse-finetune targets, expected {len(want)} "
                                 f"(every Linear/Conv1D in the blocks)")
        return {"targets": got, "verify": compiled.program.history[-1].verify}
    return cell


def _cell_train(m: MatrixModel) -> dict[str, Any]:
    run = m.trained()
    losses = run.trainer.stats.losses
    _check(len(losses) == m.config.train_steps, f"{len(losses)} losses for "
                                                f"{m.config.train_steps} steps")
    _check(all(math.isfinite(x) for x in losses), f"non-finite loss: {losses}")
    # batches cycle through 4: the last 4 steps see the batches of the first 4
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    _check(last < first, f"loss did not fall: first 4 steps {first:.4g}, last 4 {last:.4g}")
    path = os.path.join(m.out("train"), "deltas.safetensors")
    _check(os.path.getsize(path) > 0, "no deltas file written")
    return {"loss_first": losses[0], "loss_last": losses[-1], "deltas_bytes":
            os.path.getsize(path)}


def _attention_pass(m: MatrixModel) -> str:
    b = m.config.block
    return f"block-sparse-attention:layout=sliding-window,window={b},sink=0,block={b}"


def _layers(m: MatrixModel) -> int:
    cfg = getattr(m.built().model, "config", None)
    for key in ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    return m.config.layers


def _cell_attention(m: MatrixModel) -> dict[str, Any]:
    from .. import compile as compile_

    compiled = compile_(m.program(), passes=[_attention_pass(m)], backend=m.config.backend)
    section = compiled.program.state.get("report", {}).get("attention", {})
    found, done = section.get("sites_found", 0), section.get("sites_rewritten", 0)
    want = _layers(m) * m.entry.attention_sites_per_layer
    _check(found == want, f"{found} attention sites found, expected {want} (one per layer)")
    skipped = section.get("skipped", [])
    _check(all(s.get("reason") for s in skipped), "a site was skipped without a reason")
    _check(not skipped, f"{len(skipped)} of {found} sites skipped: {skipped[0]['reason']}"
           if skipped else "")
    if m.entry.causal:
        bad = [s for s in section.get("sites", []) if not s.get("causal")]
        _check(not bad, f"{len(bad)} of {done} rewritten sites not causal "
                        f"(the causal mask was not recognised)")
    return {"found": found, "rewritten": done, "density": section.get("density", {})
            .get("value") if isinstance(section.get("density"), dict) else None}


def _cell_joint(m: MatrixModel) -> dict[str, Any]:
    from .. import compile as compile_

    # lowering a step program to eager checks it against one eager step (report's grad_check)
    compiled = compile_(m.program(), passes=["joint-graph:lr=0.001", "prune-backward"],
                        backend="eager")
    check = compiled.report["grad_check"]
    tol = 1e-5 if m.config.dtype == torch.float32 else 2e-2
    _check(check["rel_l2_err"] <= tol, f"gradients differ from eager autograd: normwise "
                                       f"{check['rel_l2_err']:.3g} > {tol:g}")
    return {"grad_rel_l2_err": check["rel_l2_err"]}


def _cell_deploy(m: MatrixModel) -> dict[str, Any]:
    from .. import compile as compile_

    run = m.trained()
    zm = m.built(onnx=True)
    deltas = os.path.join(m.out("train"), "deltas.safetensors")
    compiled = compile_(m.program(onnx=True), passes=[FINETUNE_FOR_TRAINING], deltas=deltas,
                        backend="onnx", out_dir=m.out("deploy"), force=True)
    # the trained forward graph is traced at the example shapes: compare there, on fresh
    # inputs (the ONNX cell checks the second batch size)
    inputs = zm.inputs(seed=7)
    got = compiled(*inputs)[0]
    trained = run.compiled.program.forward_module()
    want = _main(_eager(trained, inputs))
    err = _rel(got, want)
    _check(err <= 1e-4, f"deployed ONNX differs from the trained model: rel err {err:.3g}")
    moved = _rel(_main(_eager(zm.model, inputs)), want)
    _check(moved > 1e-6, "the trained deltas did not change the outputs")
    return {"rel_err": err, "moved_by_training": moved}


_CELLS: dict[str, Callable[[MatrixModel], dict[str, Any]]] = {
    "trace": _cell_trace, "onnx": _cell_onnx, "delta": _finetune_cell("delta"),
    "structured": _finetune_cell("structured"), "nm": _finetune_cell("nm"),
    "train": _cell_train, "attention": _cell_attention, "joint": _cell_joint,
    "deploy": _cell_deploy}

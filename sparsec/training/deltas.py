"""Trained sparse deltas as artifacts: save, load, apply, merge, unmerge, compose.

A deltas file is safetensors with a JSON header under the metadata key `sparsec`:
`{"format", "sparsec_version", "base_fingerprint", "methods", "targets": {weight: {method,
path, shape, attrs}}, "info"}`; tensors are named `<weight>/<part>`:

- `delta`: `indices` (flat int64, sorted) and `values`;
- `structured`: `index` (rows or columns, by `attrs.axis`) and `delta`;
- `nm`: `weight`, the trained dense weight (the layer computes with W ⊙ nm_mask(W)).

Deltas belong to one base model, named by its fingerprint (`Program.fingerprint`); loading or
merging them onto another base is refused with a one-line `BadInputError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx

from .._util import atomic_write_bytes, load_with_header, read_regular_file
from ..errors import BadInputError
from ..ops.nm import apply_nm
from ..ops.sparse_delta import apply_delta
from ..ops.structured import apply_structured
from ..passes.sparse_finetune import FINETUNE_OPS, finetune_nodes, refresh_report
from ..program import Program, fingerprint

__all__ = ["Deltas", "TargetDelta", "MergeUndo", "FORMAT", "extract_deltas", "save_deltas",
           "load_deltas", "check_base", "check_deltas", "apply_deltas", "merge_deltas",
           "unmerge_deltas",
           "compose_deltas"]

FORMAT = 1
_PARTS = {"delta": ("indices", "values"), "structured": ("index", "delta"), "nm": ("weight",)}


@dataclass
class TargetDelta:
    """The trained tensors of one target weight."""

    method: str
    shape: tuple[int, int]
    tensors: dict[str, torch.Tensor]
    attrs: dict[str, Any] = field(default_factory=dict)
    path: str = ""

    def merged(self, weight: torch.Tensor) -> torch.Tensor:
        """The dense weight this delta makes of `weight`, computed as the op computes it."""
        t = self.tensors
        if self.method == "delta":
            return apply_delta(weight, t["indices"].to(weight.device),
                               t["values"].to(weight.device))
        if self.method == "structured":
            return apply_structured(weight, t["index"].to(weight.device),
                                    t["delta"].to(weight.device), self.attrs["axis"])
        return apply_nm(t["weight"].to(weight.device), self.attrs["n"], self.attrs["m"])

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat indices, values) of Δ, for `delta` and `structured`."""
        t = self.tensors
        if self.method == "delta":
            return t["indices"], t["values"]
        if self.method == "structured":
            rows, cols = self.shape
            index, delta = t["index"], t["delta"]
            if self.attrs["axis"] == 0:
                flat = index[:, None] * cols + torch.arange(cols)
            else:
                flat = torch.arange(rows)[:, None] * cols + index[None, :]
            order = flat.reshape(-1).argsort()
            return flat.reshape(-1)[order], delta.reshape(-1)[order]
        raise BadInputError(f"{self.path or 'target'}: nm deltas replace the whole weight; they "
                            "cannot be composed with another delta on the same weight")


@dataclass
class Deltas:
    """Trained sparse deltas for one base model, by target weight name."""

    base_fingerprint: str
    targets: dict[str, TargetDelta]
    sparsec_version: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return sorted({t.method for t in self.targets.values()})

    def header(self) -> dict[str, Any]:
        return {"format": FORMAT, "sparsec_version": self.sparsec_version or _version(),
                "base_fingerprint": self.base_fingerprint, "methods": self.methods,
                "targets": {w: {"method": t.method, "path": t.path, "shape": list(t.shape),
                                "attrs": t.attrs} for w, t in self.targets.items()},
                "info": self.info}


@dataclass
class MergeUndo:
    """What `merge_deltas` overwrote, to restore the base weights bit for bit."""

    base_fingerprint: str
    saved: dict[str, tuple[TargetDelta, torch.Tensor]]


# from and to programs --------------------------------------------------------------------------
def extract_deltas(program: Program, info: dict[str, Any] | None = None) -> Deltas:
    """The current trained tensors of every sparse fine-tuning op in `program` (copies)."""
    targets = {}
    for node in finetune_nodes(program):
        method, weight = FINETUNE_OPS[node.target], node.args[1].target
        w = program.get_tensor(weight)
        rec = program.state.get("sparse_finetune", {}).get("targets", {}).get(weight, {})
        if method == "nm":
            tensors, attrs = {"weight": w}, {"n": node.args[3], "m": node.args[4]}
        else:
            tensors = dict(zip(_PARTS[method], (program.get_tensor(a.target)
                                                for a in node.args[3:5])))
            attrs = {"axis": node.args[5]} if method == "structured" else {}
        targets[weight] = TargetDelta(method, tuple(w.shape),
                                      {k: v.detach().cpu().clone().contiguous()
                                       for k, v in tensors.items()}, attrs, rec.get("path", ""))
    if not targets:
        raise BadInputError("the program has no sparse fine-tuning ops, so no deltas; add a "
                            "sparse-finetune pass to the recipe")
    return Deltas(program.fingerprint, targets, _version(), dict(info or {}))


def apply_deltas(program: Program, deltas: Deltas, *, partial: bool = False) -> None:
    """Put trained deltas into a program compiled with the recipe they were trained with.

    Indices may differ from the program's own selection (prune–regrow, composition): they are
    replaced along with the values. Create a Trainer only after this. Everything is checked
    (`check_deltas`) before the program is changed.
    """
    check_deltas(program, deltas, partial=partial)
    nodes = {n.args[1].target: n for n in finetune_nodes(program)}
    for weight, td in deltas.targets.items():
        _apply_target(program, nodes[weight], td)
    refresh_report(program)


def check_deltas(program: Program, deltas: Deltas, *, partial: bool = False) -> None:
    """Refuse deltas that do not fit `program`, before anything is changed.

    Every tensor is checked against the program's real parameters (not only against the
    file's own header): the base fingerprint; the target is fine-tuned here, by the same
    method and attributes; shapes and dtypes; indices in range, sorted and unique; values
    finite; and, unless `partial`, every fine-tuned weight of the program has its delta.
    """
    check_base(deltas, program)
    nodes = {n.args[1].target: n for n in finetune_nodes(program)}
    for weight, td in deltas.targets.items():
        node = nodes.get(weight)
        if node is None:
            raise BadInputError(f"the deltas train {weight}, which this program does not "
                                "fine-tune; compile with the recipe the deltas were trained with")
        method = FINETUNE_OPS[node.target]
        if method != td.method:
            raise BadInputError(f"{weight}: the deltas are {td.method!r} but the recipe makes it "
                                f"{method!r}; use the recipe the deltas were trained with")
        problem = _misfit(program, node, td)
        if problem:
            raise BadInputError(f"{weight}: {problem}; these deltas do not belong to this "
                                "program (give the file `sparsec train` wrote for it)")
    missing = sorted(set(nodes) - set(deltas.targets))
    if missing and not partial:
        raise BadInputError(f"the deltas lack {missing[0]} ({len(missing)} of {len(nodes)} "
                            "fine-tuned weights missing); give the complete file, or "
                            "--partial-deltas to keep the untrained ones as they are")


def _misfit(program: Program, node: fx.Node, td: TargetDelta) -> str | None:
    """Why `td` cannot go into the op `node` of `program` (None if it can)."""
    weight = program.gm.get_parameter(node.args[1].target)
    shape = tuple(weight.shape)
    if tuple(td.shape) != shape:
        return f"the file says the weight is {list(td.shape)}, the model's is {list(shape)}"
    if td.method == "nm":
        if (node.args[3], node.args[4]) != (td.attrs.get("n"), td.attrs.get("m")):
            return (f"the deltas are {td.attrs.get('n')}:{td.attrs.get('m')} but the recipe "
                    f"says {node.args[3]}:{node.args[4]}")
        return _tensor_misfit("weight", td.tensors["weight"], shape, weight.dtype)
    index_part, value_part = _PARTS[td.method]
    index, value = td.tensors[index_part], td.tensors[value_part]
    own_index, own_value = program.get_tensor(node.args[3].target), \
        program.get_tensor(node.args[4].target)
    if td.method == "structured":
        if node.args[5] != td.attrs.get("axis"):
            return (f"the deltas select axis {td.attrs.get('axis')} but the recipe axis "
                    f"{node.args[5]}")
        lines = shape[node.args[5]]
        want = (index.numel(), shape[1]) if node.args[5] == 0 else (shape[0], index.numel())
    else:
        lines, want = weight.numel(), tuple(index.shape)
    if index.dtype != own_index.dtype or index.dim() != 1:
        return f"{index_part} must be 1-D {own_index.dtype}, got {index.dim()}-D {index.dtype}"
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= lines):
        return f"{index_part} out of range [0, {lines})"
    if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
        return f"{index_part} must be sorted and unique"
    return _tensor_misfit(value_part, value, want, own_value.dtype)


def _tensor_misfit(part: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype) -> str | None:
    if tuple(t.shape) != tuple(shape):
        return f"{part} has shape {list(t.shape)}, the model needs {list(shape)}"
    if t.dtype != dtype:
        return f"{part} is {t.dtype}, the model's is {dtype}"
    if t.numel() and not bool(torch.isfinite(t).all()):
        return f"{part} holds NaN or Inf values"
    return None


def _apply_target(program: Program, node: fx.Node, td: TargetDelta) -> None:
    gm = program.gm
    if td.method == "nm":
        if (node.args[3], node.args[4]) != (td.attrs["n"], td.attrs["m"]):
            raise BadInputError(f"{node.args[1].target}: the deltas are "
                                f"{td.attrs['n']}:{td.attrs['m']} but the recipe says "
                                f"{node.args[3]}:{node.args[4]}")
        with torch.no_grad():
            gm.get_parameter(node.args[1].target).copy_(td.tensors["weight"])
        return
    if td.method == "structured" and node.args[5] != td.attrs["axis"]:
        raise BadInputError(f"{node.args[1].target}: the deltas select axis "
                            f"{td.attrs['axis']} but the recipe axis {node.args[5]}")
    index_name, value_name = node.args[3].target, node.args[4].target
    index, value = td.tensors[_PARTS[td.method][0]], td.tensors[_PARTS[td.method][1]]
    old_index, old = gm.get_buffer(index_name), gm.get_parameter(value_name)
    if old_index.shape == index.shape and old.shape == value.shape:  # keep identities for an
        with torch.no_grad():                                          # optimizer that has them
            old_index.copy_(index)
            old.copy_(value)
    else:
        _set_tensor(gm, index_name, index.to(old.device).clone(), param=False)
        _set_tensor(gm, value_name, torch.nn.Parameter(value.to(old.device, old.dtype).clone(),
                                                       requires_grad=old.requires_grad), param=True)
    rec = program.state.get("sparse_finetune", {}).get("targets", {}).get(node.args[1].target)
    if rec is not None:
        rec["trainable"] = value.numel()


def _set_tensor(gm: torch.nn.Module, qualname: str, value: torch.Tensor, param: bool) -> None:
    *parents, leaf = qualname.split(".")
    mod = gm
    for part in parents:
        mod = getattr(mod, part)
    if param:
        mod.register_parameter(leaf, value)
    else:
        mod.register_buffer(leaf, value)


# files -----------------------------------------------------------------------------------------
def save_deltas(deltas: Deltas, path: str | Path) -> Path:
    """Write `deltas` as safetensors with the JSON header, atomically."""
    from safetensors.torch import save

    tensors = {f"{w}/{k}": v.detach().cpu().contiguous()
               for w, td in deltas.targets.items() for k, v in td.tensors.items()}
    data = save(tensors, metadata={"sparsec": json.dumps(deltas.header(), sort_keys=True)})
    path = Path(path)
    atomic_write_bytes(path, data)
    return path


def load_deltas(path: str | Path, base: Program | torch.nn.Module | str | None = None) -> Deltas:
    """Read a deltas file (and, with `base`, check that it belongs to that base model)."""
    from safetensors import SafetensorError

    p = Path(path)
    data = read_regular_file(p, "deltas file")
    try:
        tensors, header = load_with_header(data, "sparsec")
    except (OSError, SafetensorError, ValueError, RecursionError) as e:
        raise BadInputError(f"{p}: not a readable safetensors deltas file ({type(e).__name__}); "
                            "give a deltas.safetensors written by sparsec") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise BadInputError(f"{p}: no sparsec deltas header of format {FORMAT}; give a "
                            "deltas.safetensors written by sparsec train")
    try:
        targets = {weight: _target(p, weight, t, tensors)
                   for weight, t in header["targets"].items()}
        deltas = Deltas(header["base_fingerprint"], targets, header.get("sparsec_version", ""),
                        header.get("info", {}))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BadInputError(f"{p}: the deltas header is malformed ({type(e).__name__}: {e}); "
                            "the file is damaged, save it again") from None
    if base is not None:
        check_base(deltas, base, where=str(p))
    return deltas


def _target(p: Path, weight: str, t: dict[str, Any], tensors: dict[str, torch.Tensor]
            ) -> TargetDelta:
    parts = _PARTS.get(t["method"], ())
    missing = [k for k in parts if f"{weight}/{k}" not in tensors]
    if not parts or missing:
        raise BadInputError(f"{p}: target {weight} lacks {missing or t['method']}; the file "
                            "is damaged, save it again")
    td = TargetDelta(t["method"], tuple(int(x) for x in t["shape"]),
                     {k: tensors[f"{weight}/{k}"] for k in parts}, t.get("attrs", {}),
                     t.get("path", ""))
    problem = _invalid(td)
    if problem:
        raise BadInputError(f"{p}: target {weight}: {problem}; the file is damaged or was "
                            "edited, save it again")
    return td


def _invalid(td: TargetDelta) -> str | None:
    """Why the tensors of `td` cannot be a delta of a weight of td.shape (None if they can)."""
    rows, cols = td.shape
    t = td.tensors
    if td.method == "delta":
        idx, val = t["indices"], t["values"]
        if idx.dtype != torch.int64 or idx.dim() != 1 or val.shape != idx.shape:
            return "indices must be int64 and as long as values"
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= rows * cols):
            return f"indices out of range for a {rows}x{cols} weight"
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            return "indices must be sorted and unique"
    elif td.method == "structured":
        axis = td.attrs.get("axis")
        if axis not in (0, 1):
            return f"axis must be 0 or 1, got {axis!r}"
        idx, delta, lines = t["index"], t["delta"], (rows, cols)[axis]
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= lines):
            return f"index out of range for {lines} {'rows' if axis == 0 else 'columns'}"
        want = (idx.numel(), cols) if axis == 0 else (rows, idx.numel())
        if tuple(delta.shape) != want:
            return f"delta has shape {tuple(delta.shape)}, expected {want}"
    elif tuple(t["weight"].shape) != (rows, cols):
        return f"weight has shape {tuple(t['weight'].shape)}, expected {(rows, cols)}"
    return None


def check_base(deltas: Deltas, base: Program | torch.nn.Module | str, where: str = "") -> None:
    """Refuse deltas made for another base model (one line, exit code 2)."""
    if isinstance(base, Program):
        fp = base.fingerprint
    elif isinstance(base, torch.nn.Module):
        fp = fingerprint(base)
    else:
        fp = str(base)
    if fp != deltas.base_fingerprint:
        src = f"{where}: " if where else ""
        raise BadInputError(f"{src}these deltas were trained on base model "
                            f"{deltas.base_fingerprint}, not on this one ({fp}); load them onto "
                            "the model they were trained on")


# merging ---------------------------------------------------------------------------------------
def merge_deltas(base: Program | torch.nn.Module, deltas: Deltas) -> MergeUndo:
    """Write W + Δ (W ⊙ mask for nm) into the base's dense weights, in place.

    Returns what was overwritten; `unmerge_deltas(base, undo)` restores it bit for bit (adding
    and subtracting Δ in floating point would not).
    """
    check_base(deltas, base)
    module = base.gm if isinstance(base, Program) else base
    if isinstance(base, Program):
        busy = {n.args[1].target for n in finetune_nodes(base)} & set(deltas.targets)
        if busy:
            raise BadInputError(f"{sorted(busy)[0]} is fine-tuned by a sparse op in this program; "
                                "merge into the base model, or run the merge-sparse pass")
    saved = {}
    with torch.no_grad():
        for weight, td in deltas.targets.items():
            w = _weight(module, weight, td)
            saved[weight] = (td, _touched(w, td).clone())
            w.copy_(td.merged(w))
    return MergeUndo(deltas.base_fingerprint, saved)


def unmerge_deltas(base: Program | torch.nn.Module, undo: MergeUndo) -> None:
    """Restore the weights `merge_deltas` overwrote, bit for bit."""
    module = base.gm if isinstance(base, Program) else base
    with torch.no_grad():
        for weight, (td, original) in undo.saved.items():
            w = _weight(module, weight, td)
            if td.method == "delta":
                w.view(-1).index_copy_(0, td.tensors["indices"].to(w.device), original)
            elif td.method == "structured":
                w.index_copy_(td.attrs["axis"], td.tensors["index"].to(w.device), original)
            else:
                w.copy_(original)


def _weight(module: torch.nn.Module, name: str, td: TargetDelta) -> torch.Tensor:
    try:
        w = module.get_parameter(name)
    except AttributeError:
        raise BadInputError(f"the base model has no parameter {name}; these deltas belong to "
                            "another architecture") from None
    if tuple(w.shape) != tuple(td.shape):
        raise BadInputError(f"{name} is {tuple(w.shape)} but the deltas expect "
                            f"{tuple(td.shape)}; load them onto the model they were trained on")
    return w


def _touched(w: torch.Tensor, td: TargetDelta) -> torch.Tensor:
    if td.method == "delta":
        return w.reshape(-1)[td.tensors["indices"].to(w.device)]
    if td.method == "structured":
        return w.index_select(td.attrs["axis"], td.tensors["index"].to(w.device))
    return w


# composing -------------------------------------------------------------------------------------
def compose_deltas(a: Deltas, b: Deltas, *, overlap: str = "error") -> Deltas:
    """One delta with the entries of both (a language delta and a task delta, say).

    Where both train the same weight, the result is a `delta` over the union of their entries.
    Entries both set are an error unless `overlap="sum"`, which adds them.
    """
    if overlap not in ("error", "sum"):
        raise BadInputError(f"overlap must be 'error' or 'sum', got {overlap!r}")
    if a.base_fingerprint != b.base_fingerprint:
        raise BadInputError(f"cannot compose deltas of different base models "
                            f"({a.base_fingerprint} and {b.base_fingerprint})")
    targets = dict(a.targets)
    for weight, tb in b.targets.items():
        ta = targets.get(weight)
        targets[weight] = tb if ta is None else _union(weight, ta, tb, overlap)
    return Deltas(a.base_fingerprint, targets, _version(),
                  {"composed": [a.info, b.info], "overlap": overlap})


def _union(weight: str, ta: TargetDelta, tb: TargetDelta, overlap: str) -> TargetDelta:
    ia, va = ta.flat()
    ib, vb = tb.flat()
    both = torch.isin(ia, ib)
    if both.any() and overlap == "error":
        raise BadInputError(f"the deltas overlap at {int(both.sum())} entries of {weight}; pass "
                            "overlap='sum' to add them, or train them on disjoint entries")
    idx = torch.cat([ia, ib])
    vals = torch.cat([va, vb.to(va.dtype)])
    unique, inverse = torch.unique(idx, sorted=True, return_inverse=True)
    summed = vals.new_zeros(unique.numel()).index_add_(0, inverse, vals)
    return TargetDelta("delta", ta.shape, {"indices": unique, "values": summed}, {}, ta.path)


def _version() -> str:
    from .._version import __version__

    return __version__

"""`sparsec export MODEL --deltas D --format hf|peft-shira -o DIR`: trained models in the
formats the ecosystem loads.

- `hf`: the merged model (W + Δ, or the trained tensors of a full/freeze run) as a
  transformers `save_pretrained` directory (config, safetensors weights, tokenizer), loadable
  with `AutoModel*.from_pretrained`. The export is reloaded and checked against the merged
  model on the example inputs (`parity.max_abs_err` in `export.json`).
- `peft-shira`: the base model stays as it is; the deltas become a PEFT SHiRA adapter
  (`adapter_config.json`, `adapter_model.safetensors`) loaded with
  `PeftModel.from_pretrained(base, DIR)`. SHiRA stores, per linear layer, r·(in+out) indices and
  values; sparsec's entries are stored exactly and the rest of the r·(in+out) slots hold explicit
  zeros at other positions (adding 0 changes nothing), with one r for all layers.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch

from .errors import BadInputError

__all__ = ["FORMATS", "export_model", "describe"]

FORMATS = ("hf", "peft-shira")
_AUTO = {"causal-lm": "AutoModelForCausalLM", "masked-lm": "AutoModelForMaskedLM",
         "sequence-classification": "AutoModelForSequenceClassification",
         "embedding": "AutoModel"}


def export_model(model: str | Path, deltas: str | Path, out_dir: str | Path, *,
                 fmt: str = "hf", source: Any = None, force: bool = False) -> dict[str, Any]:
    """Export `model` (an HF checkpoint directory or a model.py whose model() holds a
    transformers model) with the trained `deltas` (or trainable.safetensors); returns the
    export record also written as `export.json`."""
    from .outputs import staged_output
    from .sources import open_model

    if fmt not in FORMATS:
        raise BadInputError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if Path(out_dir).exists() and not force:
        raise BadInputError(f"{out_dir}: output directory exists; pass --force to replace it")
    if not Path(deltas).is_file():
        raise BadInputError(f"{deltas}: no such deltas file")
    opened = open_model(model, source)
    module = opened.program.source.module
    prefix, pretrained = _pretrained(module, model)
    with staged_output(out_dir, force=force) as staging:
        if fmt == "hf":
            record = _export_merged(opened, module, prefix, pretrained, Path(deltas), staging)
        else:
            record = _export_shira(opened, prefix, pretrained, Path(deltas), staging)
        record.update({"format": fmt, "model": str(model), "deltas": str(deltas)})
        (staging / "export.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _pretrained(module: torch.nn.Module, model: Any) -> tuple[str, torch.nn.Module]:
    from .hf_source import find_pretrained

    found = find_pretrained(module)
    if found is None:
        raise BadInputError(f"{model}: the model is a {type(module).__name__} with no "
                            "transformers PreTrainedModel inside, so there is no HF format to "
                            "write; deploy it with `sparsec compile --deltas D --backend onnx`")
    return found


def _merge(program: Any, module: torch.nn.Module, deltas: Path) -> dict[str, Any]:
    """Write the trained weights into the eager `module` (in place); what was merged."""
    from .training.deltas import load_deltas
    from .trainable import is_trainable_file, load_trainable

    if is_trainable_file(deltas):
        header, tensors = load_trainable(deltas)
        if header["base_fingerprint"] != program.fingerprint:
            raise BadInputError(f"{deltas}: trained on base model {header['base_fingerprint']}, "
                                f"not on this one ({program.fingerprint})")
        with torch.no_grad():
            for name, t in tensors.items():
                _param(module, name, tuple(t.shape)).copy_(t)
        return {"kind": "trainable", "tensors": len(tensors)}
    d = load_deltas(deltas, base=program)
    with torch.no_grad():
        for name, td in d.targets.items():
            w = _param(module, name, td.shape)
            w.copy_(td.merged(w))
    return {"kind": "deltas", "targets": len(d.targets), "methods": d.methods}


def _param(module: torch.nn.Module, name: str, shape: tuple) -> torch.nn.Parameter:
    try:
        p = module.get_parameter(name)
    except AttributeError:
        raise BadInputError(f"the model has no parameter {name}; the file belongs to another "
                            "model") from None
    if tuple(p.shape) != tuple(shape):
        raise BadInputError(f"{name} is {tuple(p.shape)} but the file holds {tuple(shape)}")
    return p


def _export_merged(opened: Any, module: torch.nn.Module, prefix: str,
                   pretrained: torch.nn.Module, deltas: Path, out: Path) -> dict[str, Any]:
    record = {"merged": _merge(opened.program, module, deltas)}
    pretrained.save_pretrained(out, safe_serialization=True)
    if opened.tokenizer is not None:
        opened.tokenizer.save_pretrained(out)
    record["parity"] = _parity(opened, module, out)
    return record


def _auto_class(opened: Any, pretrained: torch.nn.Module) -> Any:
    import transformers

    if opened.task is not None:
        return getattr(transformers, _AUTO[opened.task])
    return type(pretrained)


@torch.no_grad()
def _parity(opened: Any, module: torch.nn.Module, out: Path) -> dict[str, Any]:
    """Reload the export with transformers and compare it with the merged model."""
    from .pipeline import compare_outputs

    _, pretrained = _pretrained(module, out)
    loaded = _auto_class(opened, pretrained).from_pretrained(out, local_files_only=True)
    loaded.eval()
    inputs = opened.program.example_inputs
    want = _first_tensor(module(*inputs))
    if module is pretrained:
        swapped, got = "", _first_tensor(loaded(*inputs))
    else:
        swapped = _swap(module, pretrained, loaded)
        try:
            got = _first_tensor(module(*inputs))
        finally:
            _swap(module, loaded, pretrained)
    err = compare_outputs(got, want)
    if not err["max_rel_err"] <= 1e-4:
        raise BadInputError(f"the exported model reloads with max relative error "
                            f"{err['max_rel_err']:.3g}; the export is wrong, please report it")
    return {"max_abs_err": err["max_abs_err"], "max_rel_err": err["max_rel_err"],
            "checked": swapped}


def _swap(root: torch.nn.Module, old: torch.nn.Module, new: torch.nn.Module) -> str:
    """Put `new` where `old` sits in `root` (by identity); returns its path."""
    for name, sub in root.named_modules():
        for child_name, child in sub.named_children():
            if child is old:
                setattr(sub, child_name, new)
                return f"{name}.{child_name}".strip(".")
    raise BadInputError("internal: the transformers model was not found in the wrapper")


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        if hasattr(out, key):
            return getattr(out, key)
    return out[0]


# PEFT SHiRA -----------------------------------------------------------------------------------
def _export_shira(opened: Any, prefix: str, pretrained: torch.nn.Module, deltas: Path,
                  out: Path) -> dict[str, Any]:
    from peft import ShiraConfig, get_peft_model

    from .training.deltas import load_deltas
    from .trainable import is_trainable_file

    if is_trainable_file(deltas):
        raise BadInputError(f"{deltas}: full/freeze fine-tuning trains dense tensors, which a "
                            "sparse SHiRA adapter cannot hold; export with --format hf")
    d = load_deltas(deltas, base=opened.program)
    entries = {_relative(name, prefix): _flat_entries(name, td) for name, td in d.targets.items()}
    layers = {name: _linear(pretrained, name) for name in entries}
    r = max(math.ceil(len(idx) / (lin.in_features + lin.out_features))
            for name, (idx, _) in entries.items() for lin in [layers[name]])
    masks = {name: _padded(entries[name], lin, r, name) for name, lin in layers.items()}
    with warnings.catch_warnings():  # PEFT warns that it does not know our mask type
        warnings.simplefilter("ignore")
        config = ShiraConfig(r=r, target_modules=sorted(layers), mask_type="sparsec",
                             init_weights=True)
        config.mask_fn = _mask_fn(masks, layers)
        peft_model = get_peft_model(pretrained, config)
    _fill_values(peft_model, masks)
    peft_model.save_pretrained(out, safe_serialization=True)
    return {"r": r, "targets": len(layers), "stored": sum(len(m[0]) for m in masks.values()),
            "trained": sum(len(e[0]) for e in entries.values())}


def _relative(name: str, prefix: str) -> str:
    """The module path, inside the PreTrainedModel, of the linear layer owning `name`."""
    if not name.startswith(prefix) or not name.endswith(".weight"):
        raise BadInputError(f"{name} is not a linear weight of the transformers model")
    return name[len(prefix):-len(".weight")]


def _flat_entries(name: str, td: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if td.method == "nm":
        raise BadInputError(f"{name}: an N:M delta replaces the whole weight, which a sparse "
                            "SHiRA adapter cannot hold; export with --format hf")
    return td.flat()


def _linear(pretrained: torch.nn.Module, name: str) -> torch.nn.Linear:
    try:
        mod = pretrained.get_submodule(name)
    except AttributeError:
        mod = None
    if not isinstance(mod, torch.nn.Linear):
        kind = type(mod).__name__ if mod is not None else "nothing"
        raise BadInputError(f"{name} is {kind}, not a torch.nn.Linear: PEFT SHiRA adapts "
                            "nn.Linear layers only; export with --format hf")
    return mod


def _padded(entry: tuple[torch.Tensor, torch.Tensor], lin: torch.nn.Linear, r: int,
            name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The r·(in+out) sorted flat indices SHiRA stores, and their values (0 at the padding)."""
    idx, val = entry
    total, size = r * (lin.in_features + lin.out_features), lin.in_features * lin.out_features
    if total > size:
        raise BadInputError(f"{name}: SHiRA needs one r for all layers, and r = {r} asks for "
                            f"{total} entries of a {lin.out_features}x{lin.in_features} weight; "
                            "export with --format hf")
    free = torch.ones(size, dtype=torch.bool)
    free[idx] = False
    extra = free.nonzero().reshape(-1)[:total - len(idx)]
    all_idx = torch.cat([idx, extra])
    values = torch.cat([val.to(torch.float32), torch.zeros(len(extra))])
    order = all_idx.argsort()
    return all_idx[order], values[order]


def _mask_fn(masks: dict[str, tuple[torch.Tensor, torch.Tensor]],
             layers: dict[str, torch.nn.Linear]):
    by_layer = {id(lin): masks[name][0] for name, lin in layers.items()}

    def mask_fn(base_layer: torch.nn.Module, r: int, **_: Any) -> torch.Tensor:
        w = base_layer.weight
        mask = torch.zeros(w.numel(), dtype=w.dtype, device=w.device)
        mask[by_layer[id(base_layer)].to(w.device)] = 1
        return mask.view_as(w)
    return mask_fn


def _fill_values(peft_model: Any, masks: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Put the values into SHiRA's weights, which follow torch.where's row-major order (the
    sorted flat indices)."""
    filled = 0
    for name, mod in peft_model.named_modules():
        weights = getattr(mod, "shira_weight", None)
        if weights is None or "default" not in weights:
            continue
        key = next((k for k in masks if name.endswith("." + k) or name == k), None)
        if key is None:
            continue
        rows, cols = mod.shira_indices["default"]
        flat = rows.long() * mod.in_features + cols.long()
        if not torch.equal(flat, masks[key][0]):
            raise BadInputError(f"internal: SHiRA reordered the entries of {key}")
        with torch.no_grad():
            weights["default"].copy_(masks[key][1].to(weights["default"].dtype))
        filled += 1
    if filled != len(masks):
        raise BadInputError(f"internal: PEFT adapted {filled} of {len(masks)} layers")


def describe(record: dict[str, Any], out_dir: Any) -> str:
    """The line `sparsec export` prints."""
    if record["format"] == "hf":
        p = record["parity"]
        return (f"exported {record['merged']['kind']} merged into {out_dir}/ (reloaded with "
                f"transformers: max abs err {p['max_abs_err']:.3g})")
    return (f"exported a PEFT SHiRA adapter (r={record['r']}, {record['targets']} layers, "
            f"{record['trained']:,} trained entries) to {out_dir}/")

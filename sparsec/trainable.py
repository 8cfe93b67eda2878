"""Full and `freeze` fine-tuning: what trains, checked before compiling, and the file of the
trained tensors.

A recipe with a sparse fine-tuning pass saves `deltas.safetensors` (sparsec.training.deltas);
any other recipe trains the parameters left trainable — all of them (full fine-tuning), or those
`freeze`'s `trainable` globs keep — and `sparsec train` saves them as `trainable.safetensors`:
safetensors, one tensor per trainable parameter under its name in the traced model, with the
JSON header `{"format": 1, "kind": "trainable", "base_fingerprint", "names", "info"}` under
the metadata key `sparsec_trainable`.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any, Sequence

import torch

from ._util import atomic_write_bytes
from .errors import BadInputError
from .program import Program, Prop

__all__ = ["DELTAS_FILE", "TRAINABLE_FILE", "METADATA_KEY", "output_file", "save_trainable",
           "load_trainable", "is_trainable_file"]

DELTAS_FILE, TRAINABLE_FILE = "deltas.safetensors", "trainable.safetensors"
METADATA_KEY = "sparsec_trainable"


def output_file(passes: Sequence[Any], program: Program) -> str:
    """The file a training run saves (deltas or trainable tensors), refusing before any pass
    runs a recipe that would leave nothing to train."""
    if any(Prop.SPARSE_PARAMETERS in p.establishes for p in passes):
        return DELTAS_FILE
    names = [n for n, _ in program.gm.named_parameters()]
    freezes = [p for p in passes if p.name == "freeze"]
    if freezes:
        globs = list(freezes[-1].trainable)
        if not globs:
            raise BadInputError("the freeze pass keeps nothing trainable (trainable = []); list "
                                "the parameters to train, e.g. trainable = [\"*.q_proj.*\"]")
        if not any(fnmatch.fnmatchcase(n, g) for n in names for g in globs):
            example = ", ".join(names[:3])
            raise BadInputError(f"freeze: trainable = {globs} matches no parameter of the model "
                                f"(names look like {example}); fix the globs")
    elif not names:
        raise BadInputError("the model has no parameters to train")
    return TRAINABLE_FILE


def save_trainable(program: Program, path: str | Path, info: dict[str, Any] | None = None
                   ) -> Path:
    """Write the program's trainable parameters as safetensors, atomically."""
    from safetensors.torch import save

    tensors = {n: p.detach().cpu().contiguous().clone()
               for n, p in program.forward_module().named_parameters() if p.requires_grad}
    if not tensors:
        raise BadInputError("nothing trainable to save: every parameter is frozen")
    header = {"format": 1, "kind": "trainable", "base_fingerprint": program.fingerprint,
              "names": sorted(tensors), "info": dict(info or {})}
    data = save(tensors, metadata={METADATA_KEY: json.dumps(header, sort_keys=True)})
    atomic_write_bytes(Path(path), data)
    return Path(path)


def load_trainable(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header, tensors by parameter name) of a trainable.safetensors file."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise BadInputError(f"{p}: no such file") from None
    except (SafetensorError, OSError) as e:
        raise BadInputError(f"{p}: not a readable safetensors file ({type(e).__name__})") from None
    if METADATA_KEY not in meta:
        raise BadInputError(f"{p}: not a trainable.safetensors written by sparsec train")
    return json.loads(meta[METADATA_KEY]), tensors


def is_trainable_file(path: str | Path) -> bool:
    """Whether `path` is a trainable-tensors file (else, presumably, a deltas file)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return METADATA_KEY in (f.metadata() or {})
    except Exception:
        return False


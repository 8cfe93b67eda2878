"""Triton under a guard, and the switches every kernel module shares.

Kernel modules do `from ._triton import HAS_TRITON, triton, tl`. Without Triton installed,
`triton.jit`/`triton.autotune` are no-op decorators and `tl.constexpr` a plain object, so the
modules still import (their references work; their launchers are never called: the ops check
`HAS_TRITON`).

- `interpreting()`: TRITON_INTERPRET=1 was set when Triton built the kernels; launchers then
  accept CPU tensors and skip autotuning (the interpreter runs each program in numpy).
- `autotune_enabled()`: SPARSEC_AUTOTUNE=0 pins every kernel to its heuristic tile choice
  (tests use it: one compile per shape instead of one per candidate tile).
"""

import contextlib
import os
import weakref
from dataclasses import dataclass, fields

__all__ = ["HAS_TRITON", "triton", "tl", "interpreting", "autotune_enabled", "cdiv",
           "next_pow2", "on_cuda", "enabled", "no_sync_allowed", "FORCE_REFERENCE", "SETTINGS",
           "Settings", "settings", "TensorCache"]

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    HAS_TRITON = False

    class _Shim:
        """Stands in for `triton` and `triton.language` so kernel modules import."""

        constexpr = object

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def autotune(*_, **__):
            return lambda f: f

        @staticmethod
        def heuristics(*_, **__):
            return lambda f: f

        class Config:
            def __init__(self, *args, **kwargs):
                self.kwargs, self.num_warps, self.num_stages = (args[0] if args else {}), 4, 3

    triton = tl = _Shim()

# Read once, at import: Triton decides interpretation when the @triton.jit decorators run.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Set by sparsec.kernels.references_only(): launchers then run their references.
FORCE_REFERENCE = False


@dataclass
class Settings:
    """Which variants the launchers run (read from the environment at import; `settings()`
    changes them for a block, so one process can compare variants).

    - `launch` (SPARSEC_LAUNCH): "direct" — repeated launches reuse a cached plan and call
      Triton's compiled launcher directly (`_launch.py`); "triton" — every launch goes through
      Triton's JIT and autotuner (the first version).
    - `attn_bwd` (SPARSEC_ATTN_BWD): the attention backward: "split" (dK/dV and dQ kernels,
      7 products, deterministic), "atomic" (one kernel, 5 products, dQ accumulated with
      float32 atomics), "auto" (each shape's first call times both and keeps the faster).
    - `eager` (SPARSEC_EAGER): how `sparsec.block_sparse_attention` runs eagerly on CUDA:
      "function" (a plain autograd.Function around the launchers) or "op" (through the custom
      op and its registered autograd, as traced graphs do).
    """

    launch: str = "direct"
    attn_bwd: str = "auto"
    eager: str = "function"

    @classmethod
    def from_env(cls) -> "Settings":
        s = cls(launch=os.environ.get("SPARSEC_LAUNCH", "direct"),
                attn_bwd=os.environ.get("SPARSEC_ATTN_BWD", "auto"),
                eager=os.environ.get("SPARSEC_EAGER", "function"))
        s.check()
        return s

    def check(self) -> None:
        allowed = {"launch": ("direct", "triton"), "attn_bwd": ("split", "atomic", "auto"),
                   "eager": ("function", "op")}
        for f in fields(self):
            if getattr(self, f.name) not in allowed[f.name]:
                from ..errors import BadInputError

                raise BadInputError(f"sparsec kernel setting {f.name}="
                                    f"{getattr(self, f.name)!r}: use one of {allowed[f.name]} "
                                    f"(SPARSEC_{f.name.upper()})")


SETTINGS = Settings.from_env()


@contextlib.contextmanager
def settings(**changes):
    """`with settings(launch="triton", attn_bwd="split"):` runs the block with those variants."""
    old = {k: getattr(SETTINGS, k) for k in changes}
    for k, v in changes.items():
        setattr(SETTINGS, k, v)
    try:
        SETTINGS.check()
        yield SETTINGS
    finally:
        for k, v in old.items():
            setattr(SETTINGS, k, v)


def enabled() -> bool:
    """Triton is installed and the kernels are not switched off."""
    return HAS_TRITON and not FORCE_REFERENCE


def interpreting() -> bool:
    return _INTERPRET


def autotune_enabled() -> bool:
    """Autotune unless switched off, interpreting, or where timing is not allowed: autotuning
    synchronizes with the device, which CUDA graph capture and torch's sync debug mode
    ("error"/"warn", set by code that must not sync) forbid; there the heuristic tiles run."""
    if _INTERPRET or os.environ.get("SPARSEC_AUTOTUNE", "1") == "0":
        return False
    return not no_sync_allowed()


def no_sync_allowed() -> bool:
    """True while the current CUDA stream is being captured or sync debugging is on."""
    import torch

    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_sync_debug_mode() != 0 or torch.cuda.is_current_stream_capturing()


def on_cuda(*tensors) -> bool:
    """True if the kernels may run on these tensors: CUDA tensors, or any under the
    interpreter."""
    return enabled() and (all(t.is_cuda for t in tensors) or _INTERPRET)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


class TensorCache:
    """Values derived from tensors (a transposed layout, row bounds of sorted indices), kept
    while those tensors live unmodified: a hit needs the same tensor objects (weak references)
    at the same version counters, so a new or modified tensor never hits. At most `size`
    entries; the oldest goes first. While a CUDA graph is being captured nothing is read or
    stored: the graph must own what it reads (an evicted cached value would be freed under
    it)."""

    def __init__(self, size: int):
        self.size = size
        self.entries: dict = {}

    def get(self, tensors: tuple, extra: tuple, make):
        """The cached value for (tensors, extra), or make()'s, stored."""
        import torch

        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return make()
        key = tuple(id(t) for t in tensors) + tuple(extra)
        versions = tuple(t._version for t in tensors)
        hit = self.entries.get(key)
        if hit is not None and hit[1] == versions and \
                all(r() is t for r, t in zip(hit[0], tensors)):
            return hit[2]
        value = make()
        try:
            refs = tuple(weakref.ref(t) for t in tensors)
        except TypeError:  # pragma: no cover - tensors that refuse weak references
            return value
        self.entries.pop(key, None)
        if len(self.entries) >= self.size:
            self.entries.pop(next(iter(self.entries)))
        self.entries[key] = (refs, versions, value)
        return value

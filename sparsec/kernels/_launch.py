"""Launching a Triton kernel with as little host work as possible.

Triton's `kernel[grid](...)` binds and specializes every argument, builds a cache key and
looks the compiled kernel up on every call; the autotuner adds a key of its own. With the
attention kernels' 40-60 arguments that is tens of microseconds per launch, and at short
lengths the host, not the GPU, sets the pace (measured on the H100: ~0.5 ms of host time per
4k forward against a 0.1 ms kernel). For a launch that repeats — same layout, shapes, strides
and dtypes every step, only the tensors' storage changes — all of that work gives the same
answer each time. `first_launch` runs the first call through Triton (compiling, autotuning)
and returns a `DirectLaunch` that keeps what Triton's compiled launcher needs; later calls put
the new tensors into the stored argument list and call the compiled launcher directly.

A launcher is written in three parts: a pure `plan` that turns a call's arguments into
`Launch` descriptions (kernel, grid, arguments with the per-call tensors named, meta-
parameters) without launching or allocating; `launch(launches, tensors)`, which runs them
(optionally recording their direct launches); and the cache around both (`replay` of what a
previous call recorded, keyed by `_attention_common.plan_key`).

The caller guarantees that a stored launch and a later call specialize the same way: the
same integer arguments, dtypes, and 16-byte alignment of every pointer (the attention plans
key on all three). Triton's interpreter, launch hooks (profilers such as proton) and Triton
versions whose internals differ all get `None` (every call then goes through Triton).
"""

from __future__ import annotations

from typing import Any

from ._triton import HAS_TRITON, interpreting

__all__ = ["DirectLaunch", "Launch", "launch", "replay", "first_launch", "aligned"]


class Launch:
    """One kernel launch as a plan describes it: `kernel[grid](*args, **meta)`, where a string
    in `args` names a per-call tensor (looked up in the call's tensor dict) and everything
    else (layout tensors, scalars, strides) is fixed by the plan. (A plain class with
    __slots__: plans are built on every call that misses the cache, so it stays cheap.)"""

    __slots__ = ("kernel", "grid", "args", "meta")

    def __init__(self, kernel: Any, grid: Any, args: tuple, meta: dict):
        self.kernel, self.grid, self.args, self.meta = kernel, grid, args, meta

    def bind(self, tensors: dict) -> list:
        """The argument list with this call's tensors in the named positions."""
        return [tensors[a] if type(a) is str else a for a in self.args]

    def slots(self) -> tuple[int, ...]:
        """The positions of the named (per-call) tensors."""
        return tuple(i for i, a in enumerate(self.args) if type(a) is str)

    def names(self) -> tuple[str, ...]:
        return tuple(a for a in self.args if type(a) is str)

    def __repr__(self) -> str:
        name = getattr(getattr(self.kernel, "fn", self.kernel), "__name__", "?")
        return f"Launch({name}, grid={self.grid}, names={self.names()})"


def launch(launches: list[Launch], tensors: dict, device_index: int | None = None,
           record: bool = False) -> list[tuple] | None:
    """Run `launches` in order with the named `tensors`. With `record`, each goes through
    `first_launch` and the result is [(DirectLaunch or None, names)] for `replay`."""
    if not record:
        for item in launches:
            item.kernel[item.grid](*item.bind(tensors), **item.meta)
        return None
    recorded = []
    for item in launches:
        direct = first_launch(item.kernel, item.grid, tuple(item.bind(tensors)), item.meta,
                              item.slots(), device_index)
        recorded.append((direct, item.names()))
    return recorded


def replay(recorded: list[tuple], tensors: dict) -> None:
    """Repeat recorded direct launches with this call's named tensors."""
    for direct, names in recorded:
        direct(*[tensors[n] for n in names])


def aligned(*tensors) -> bool:
    """Every tensor's storage starts on a 16-byte boundary (Triton specializes pointers on
    it): part of a plan key."""
    return all(t.data_ptr() % 16 == 0 for t in tensors)


class DirectLaunch:
    """One compiled kernel, its grid and its full argument list; `slots` are the positions
    that change per call. Call it with the tensors for the slots, in order."""

    __slots__ = ("run", "function", "packed", "grid", "args", "slots", "device", "keep",
                 "config")

    def __init__(self, compiled, grid, args, slots, device, keep, config):
        self.run = compiled.run
        self.function = compiled.function
        self.packed = compiled.packed_metadata
        self.grid = grid
        self.args = args
        self.slots = slots
        self.device = device
        self.keep = keep
        self.config = config

    def __call__(self, *tensors) -> None:
        import torch

        args = list(self.args)
        for i, t in zip(self.slots, tensors):
            args[i] = t
        g = self.grid
        self.run(g[0], g[1], g[2], torch._C._cuda_getCurrentRawStream(self.device),
                 self.function, self.packed, None, None, None, *args)


def _hooks_set() -> bool:
    """A launch hook is installed (Triton 3.6 keeps hook chains that are empty by default;
    a profiler adds to them): direct launches would skip it, so they are not made."""
    try:
        from triton import knobs

        hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    except (ImportError, AttributeError):  # pragma: no cover - other Triton versions
        return True
    return any(h is not None and getattr(h, "calls", True) for h in hooks)


def first_launch(kernel, grid, args: tuple, kwargs: dict, slots: tuple[int, ...],
                 device_index: int | None):
    """Launch `kernel[grid](*args, **kwargs)` through Triton and return a `DirectLaunch`
    repeating it (None where a direct launch is not possible). `kernel` is a JITFunction or
    an Autotuner over one; `grid` a tuple or a function of the launch's meta-parameters;
    `slots` the positions of `args` that change from call to call (tensors); the other
    tensor arguments are stored as device addresses and kept alive by the launch; the slots'
    tensors of this first call are not kept."""
    compiled = kernel[grid](*args, **kwargs)
    if not HAS_TRITON or interpreting() or device_index is None or _hooks_set():
        return None
    try:
        return _direct(kernel, grid, args, kwargs, slots, device_index, compiled)
    except (AttributeError, KeyError, TypeError):  # pragma: no cover - Triton internals moved
        return None


def _direct(kernel, grid, args, kwargs, slots, device_index, compiled):
    import torch

    jit = kernel
    config = {}
    if hasattr(kernel, "best_config") and hasattr(kernel, "fn"):  # an Autotuner
        best = kernel.best_config
        config = dict(best.kwargs)
        jit = kernel.fn
    if not hasattr(jit, "params") or compiled is None:
        return None
    values = {**kwargs, **config}
    names = [p.name for p in jit.params]
    full = list(args) + [values[n] for n in names[len(args):]]
    if callable(grid):
        grid = grid({**dict(zip(names, full)), **values})
    grid = tuple(grid) + (1,) * (3 - len(grid))
    keep, stored = [], []
    for i, a in enumerate(full):
        if i in slots:
            # every call passes its own tensors here: store no reference to this first call's
            # (a plan lives as long as its layout tensors; a stored q would pin it, its
            # autograd graph and, for a plan made while tracing, a whole real forward)
            stored.append(None)
        elif isinstance(a, torch.Tensor):
            keep.append(a)
            stored.append(a.data_ptr())
        else:
            stored.append(a)
    return DirectLaunch(compiled, grid, tuple(stored), tuple(slots), device_index, keep,
                        config)

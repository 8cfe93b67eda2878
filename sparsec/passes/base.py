"""Pass, PassResult, options and the pass registry.

A pass is a frozen dataclass: its fields are its options (hashable, printable, TOML-able). Each
field may carry metadata made by `option(...)`: help text, an allowed range or a set of choices,
which the recipe loader checks before the pass runs.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, ClassVar

from ..errors import OptionError, RecipeError
from ..program import Program, Prop

__all__ = [
    "Pass",
    "PassResult",
    "option",
    "register",
    "get_pass",
    "registered_passes",
    "providers_of",
    "stage_of",
    "ENTRY_POINT_GROUP",
    "PLUGIN_ERRORS",
]

ENTRY_POINT_GROUP = "sparsec.passes"


@dataclass
class PassResult:
    """What a pass reports: whether it changed the program, and counts for the report."""

    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


def option(default: Any, help: str = "", *, min: float | None = None, max: float | None = None,
           choices: tuple | None = None) -> Any:
    """A pass option with its help text and the values it accepts."""
    meta = {"help": help, "min": min, "max": max, "choices": choices}
    if isinstance(default, (list, dict, set)):
        raise TypeError("pass options must be immutable: use a tuple")
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Pass:
    """Base class of every pass. Subclasses are `@register`ed frozen dataclasses.

    `run` mutates the program in place and returns a `PassResult`. `reference` may return a
    function that computes what the program must output after the pass, for passes that change
    numerics by design (None means: the same outputs as before the pass).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset({Prop.FORWARD_GRAPH})
    establishes: ClassVar[frozenset[str]] = frozenset()
    invalidates: ClassVar[frozenset[str]] = frozenset()
    # Relative tolerance for verification in float32; passes that reorder reductions raise it.
    rtol: ClassVar[float] = 1e-5
    # Whether the program after this pass can be exported to ONNX.
    exportable: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_options(self)

    def run(self, program: Program) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def reference(self, program: Program) -> Callable[..., Any] | None:
        """Called on the program *before* `run`; see the class docstring."""
        return None

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __str__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options().items())
        return f"{self.name}:{opts}" if opts else self.name


def stage_of(cls: type[Pass]) -> str:
    return "joint" if Prop.JOINT_GRAPH in cls.requires else "forward"


# options -----------------------------------------------------------------------------------
def check_options(p: Pass) -> None:
    """Check each option's type and range; raise OptionError naming the option."""
    hints = typing.get_type_hints(type(p))
    for f in dataclasses.fields(p):
        value = getattr(p, f.name)
        coerced = _coerce(value, hints.get(f.name, Any), f"{p.name}.{f.name}")
        if coerced is not value:
            object.__setattr__(p, f.name, coerced)
        _check_range(coerced, f, p.name)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Accept TOML values for typed options: int for float, list for tuple; reject the rest."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except OptionError:
                pass
        raise OptionError(f"option '{where}' must be {_type_name(hint)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = (value,) if isinstance(value, str) else value
        if not isinstance(value, (list, tuple)):
            raise OptionError(f"option '{where}' must be a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(v, item, where) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(hint, type) and not isinstance(value, hint) or \
            (hint in (int, float) and isinstance(value, bool)):
        raise OptionError(f"option '{where}' must be {_type_name(hint)}, got {value!r}")
    return value


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is not None:
        return str(hint).replace("typing.", "").replace("NoneType", "None")
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


_INT64 = (-2**63, 2**63 - 1)  # what torch (seeds, sizes) and safetensors can hold


def _check_range(value: Any, f: dataclasses.Field, pass_name: str) -> None:
    m, where = f.metadata, f"{pass_name}.{f.name}"
    if value is None:
        return
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if m.get("choices") is not None and v not in m["choices"]:
            allowed = ", ".join(repr(c) for c in m["choices"])
            raise OptionError(f"option '{where}' is {v!r}; {_did_you_mean(v, m['choices'])}"
                              f"choose one of {allowed}")
        if isinstance(v, float) and not math.isfinite(v):
            raise OptionError(f"option '{where}' is {v}; give a finite number")
        if isinstance(v, int) and not isinstance(v, bool) and not _INT64[0] <= v <= _INT64[1]:
            raise OptionError(f"option '{where}' is {v}, beyond a 64-bit integer; give a "
                              f"value in [{_INT64[0]}, {_INT64[1]}]")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            lo, hi = m.get("min"), m.get("max")
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise OptionError(f"option '{where}' is {v}, out of range [{lo}, {hi}]")


def option_specs(cls: type[Pass]) -> list[dict[str, Any]]:
    """Name, type, default, help and range of each option, for `sparsec explain`."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        out.append({"name": f.name, "type": _type_name(hints.get(f.name, Any)),
                    "default": f.default, "help": f.metadata.get("help", ""),
                    "min": f.metadata.get("min"), "max": f.metadata.get("max"),
                    "choices": f.metadata.get("choices")})
    return out


# registry ----------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Pass]] = {}
_ENTRY_POINTS_LOADED = False
# Plugins that failed to load, by entry-point name: reported, not fatal, so one broken plugin
# does not stop every compile.
PLUGIN_ERRORS: dict[str, str] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available to recipes and the CLI under `cls.name`."""
    if not (inspect.isclass(cls) and issubclass(cls, Pass)):
        raise TypeError("@register takes a subclass of sparsec.Pass")
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no `name`")
    if not dataclasses.is_dataclass(cls) or "__dataclass_fields__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__} must be a @dataclass(frozen=True)")
    known = _REGISTRY.get(cls.name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        taken = f"{known.__module__}.{known.__qualname__}"
        raise TypeError(f"pass name '{cls.name}' is taken by {taken}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if inspect.isclass(obj) and issubclass(obj, Pass) and obj.name not in _REGISTRY:
                register(obj)
        except Exception as e:
            PLUGIN_ERRORS[ep.name] = f"plugin {ep.value} failed to load: {type(e).__name__}: {e}"


def registered_passes() -> dict[str, type[Pass]]:
    """Every registered pass, built-in and from plugins, by name."""
    _load_entry_points()
    from .plugins import load_env_plugins

    load_env_plugins()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    passes = registered_passes()
    if name in PLUGIN_ERRORS:
        raise RecipeError(f"pass '{name}' is unavailable: {PLUGIN_ERRORS[name]}")
    if name not in passes:
        import difflib

        close = difflib.get_close_matches(name, passes, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else "; `sparsec passes` lists them"
        raise RecipeError(f"unknown pass '{name}'{hint}; a pass of your own: import its module "
                          "with --plugin MODULE (or SPARSEC_PLUGINS), or install it with a "
                          "'sparsec.passes' entry point")
    return passes[name]


def _did_you_mean(value: Any, choices: tuple) -> str:
    import difflib

    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(value, [c for c in choices if isinstance(c, str)], n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def providers_of(prop: str) -> list[str]:
    """Names of the registered passes that establish `prop`."""
    return [n for n, c in registered_passes().items() if prop in c.establishes]

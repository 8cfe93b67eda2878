"""Layouts by name, as recipes and the CLI give them: names, their options, and the builder of
the static ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import OptionError
from . import static
from .block_layout import BlockLayout, stack_heads

__all__ = ["LayoutKind", "KINDS", "kind_of", "STATIC_LAYOUTS", "DYNAMIC_LAYOUTS", "LAYOUTS",
           "LAYOUT_OPTIONS", "build_static", "is_static"]


@dataclass(frozen=True)
class LayoutKind:
    """What the attention pass needs to know about a layout, in one place.

    `selection` says how a dynamic layout picks its blocks: "scores" (pooled block scores,
    top-k or threshold), "vertical-slash" (MInference-style lines) or "gate" (learned gates).
    """

    name: str
    options: tuple[str, ...]  # the options it reads besides block; the report lists only these
    static: bool = True
    per_head: bool = False  # a static layout that differs per head (random blocks, mixtures)
    selection: str | None = None


KINDS: dict[str, LayoutKind] = {k.name: k for k in (
    LayoutKind("dense", ()),
    LayoutKind("sliding-window", ("window", "sink")),
    LayoutKind("strided", ("stride", "window", "sink")),
    LayoutKind("dilated", ("window", "dilation", "sink")),
    LayoutKind("bigbird", ("window", "global_tokens", "random_blocks", "seed"), per_head=True),
    LayoutKind("mixture", ("mixture", "window", "sink", "stride", "dilation", "global_tokens",
                           "random_blocks", "seed"), per_head=True),
    LayoutKind("topk", ("topk", "window", "sink"), static=False, selection="scores"),
    LayoutKind("threshold", ("threshold", "topk", "window", "sink"), static=False,
               selection="scores"),
    LayoutKind("vertical-slash", ("vertical", "slash", "window", "sink"), static=False,
               selection="vertical-slash"),
    LayoutKind("learned", ("topk", "threshold", "window", "sink", "gate_dim", "gates"),
               static=False, selection="gate"),
)}
STATIC_LAYOUTS = tuple(n for n, k in KINDS.items() if k.static)
DYNAMIC_LAYOUTS = tuple(n for n, k in KINDS.items() if not k.static)
LAYOUTS = STATIC_LAYOUTS + DYNAMIC_LAYOUTS
LAYOUT_OPTIONS: dict[str, tuple[str, ...]] = {n: k.options for n, k in KINDS.items()}


def kind_of(name: str) -> LayoutKind:
    return KINDS[name]


def is_static(name: str) -> bool:
    return KINDS[name].static if name in KINDS else False


def build_static(name: str, opts: Mapping[str, Any], q_len: int, kv_len: int, heads: int,
                 causal: bool, device: Any = None) -> BlockLayout:
    """The static layout `name` for one attention geometry; heads > 1 only where it varies
    per head (bigbird's random blocks, mixtures)."""
    block = opts["block"]
    common = dict(block=block, causal=causal, device=device)
    if name == "mixture":
        names = tuple(opts.get("mixture") or ())
        if not names:
            raise OptionError("layout 'mixture' needs `mixture = [\"sliding-window\", ...]`, "
                              "the static layouts its heads cycle through")
        bad = [n for n in names if n not in STATIC_LAYOUTS or n == "mixture"]
        if bad:
            raise OptionError(f"mixture entry '{bad[0]}' is not a static layout; choose from "
                              f"{', '.join(n for n in STATIC_LAYOUTS if n != 'mixture')}")
        per = [build_static(names[h % len(names)], {**opts, "seed": opts.get("seed", 0) + h},
                            q_len, kv_len, 1, causal, device) for h in range(heads)]
        return stack_heads(per)
    if name == "dense":
        return static.dense(q_len, kv_len, **common)
    if name == "sliding-window":
        return static.sliding_window(q_len, kv_len, window=opts["window"], sink=opts["sink"],
                                     **common)
    if name == "strided":
        return static.strided(q_len, kv_len, stride=opts["stride"], window=opts["window"],
                              sink=opts["sink"], **common)
    if name == "dilated":
        return static.dilated(q_len, kv_len, window=opts["window"], dilation=opts["dilation"],
                              sink=opts["sink"], **common)
    if name == "bigbird":
        return static.bigbird(q_len, kv_len, window=opts["window"],
                              global_tokens=opts["global_tokens"],
                              random_blocks=opts["random_blocks"], heads=heads,
                              seed=opts["seed"], **common)
    raise OptionError(f"layout '{name}' is not static; choose one of {', '.join(STATIC_LAYOUTS)}")

"""Layouts by name, as recipes and the CLI give them: names, their options, and the builder of
the static ones."""

from __future__ import annotations

from typing import Any, Mapping

from ..errors import OptionError
from . import static
from .block_layout import BlockLayout, stack_heads

__all__ = ["STATIC_LAYOUTS", "DYNAMIC_LAYOUTS", "LAYOUTS", "LAYOUT_OPTIONS", "build_static",
           "is_static"]

STATIC_LAYOUTS = ("dense", "sliding-window", "strided", "dilated", "bigbird", "mixture")
DYNAMIC_LAYOUTS = ("topk", "threshold", "vertical-slash", "learned")
LAYOUTS = STATIC_LAYOUTS + DYNAMIC_LAYOUTS

# The options each layout reads (besides block); the report lists only these.
LAYOUT_OPTIONS: dict[str, tuple[str, ...]] = {
    "dense": (),
    "sliding-window": ("window", "sink"),
    "strided": ("stride", "window", "sink"),
    "dilated": ("window", "dilation", "sink"),
    "bigbird": ("window", "global_tokens", "random_blocks", "seed"),
    "mixture": ("mixture", "window", "sink", "stride", "dilation", "global_tokens",
                "random_blocks", "seed"),
    "topk": ("topk", "window", "sink"),
    "threshold": ("threshold", "topk", "window", "sink"),
    "vertical-slash": ("vertical", "slash", "window", "sink"),
    "learned": ("topk", "threshold", "window", "sink", "gate_dim", "gates"),
}


def is_static(name: str) -> bool:
    return name in STATIC_LAYOUTS


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

"""Layouts by name, as recipes and the CLI give them: one strategy object per layout that says
what the attention pass adds to the graph for it, how it selects blocks in the graph and how
its reference selects them.

A `LayoutSpec` answers, for one attention site (`site`: anything with q_len, kv_len, heads,
kv_heads, head_dim, causal, scale and name, such as `passes.attention_match.Site`) under the
pass's options (`opts`: a mapping of option name → value):

- `check(opts)`: refuse inconsistent options (one line, `OptionError`);
- `build(opts, …)`: a static layout's `BlockLayout` (static layouts only);
- `graph_inputs(opts, site, index, layout)`: the tensors the site's op reads besides q, k, v
  (a static layout's four index tensors, a learned gate's parameters; none for a layout that
  is selected from q and k);
- `select(opts, site, q, k, inputs)`: the four layout tensors the op runs under, computed in
  the graph from q, k and those inputs (traced into the rewritten graph; the selection ops
  `torch.ops.sparsec.*` are registered by `sparsec.ops`, which the pass imports);
- `reference_keep(opts, site, q, k, inputs)`: bool [B, H, NQ, NKV], the same choice computed in
  plain torch for the pass's stated reference (dynamic layouts only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import torch

from ..errors import OptionError
from . import learned as learned_gates
from . import static
from .block_layout import BlockLayout, stack_heads
from .dynamic import pooled_block_scores, select_keep, vertical_slash_keep

__all__ = ["LayoutSpec", "LayoutInput", "StaticLayout", "ScoreSelection", "VerticalSlash",
           "LearnedGate", "KINDS", "kind_of", "STATIC_LAYOUTS", "DYNAMIC_LAYOUTS", "LAYOUTS",
           "LAYOUT_OPTIONS", "PREFIX", "build_static", "is_static"]

Tensors = tuple[torch.Tensor, ...]
PREFIX = "sparsec_attention"  # the attention pass registers every layout input under it


@dataclass(frozen=True)
class LayoutInput:
    """One tensor a site's op reads for its layout: registered on the program as `name`
    (a parameter if `parameter`; sites that give the same name share one tensor)."""

    name: str
    tensor: torch.Tensor
    parameter: bool = False


@dataclass(frozen=True)
class LayoutSpec:
    """A layout as the attention pass uses it (see the module docstring)."""

    name: str
    options: tuple[str, ...]  # the options it reads besides block; the report lists only these
    static: ClassVar[bool] = False

    def check(self, opts: Mapping[str, Any]) -> None:
        """Raise `OptionError` where the options contradict this layout."""

    def build(self, opts: Mapping[str, Any], q_len: int, kv_len: int, heads: int,
              causal: bool, device: Any = None) -> BlockLayout:
        raise OptionError(f"layout '{self.name}' is not static; choose one of "
                          f"{', '.join(STATIC_LAYOUTS)}")

    def graph_inputs(self, opts: Mapping[str, Any], site: Any, index: int,
                     layout: BlockLayout | None) -> list[LayoutInput]:
        return []

    def select(self, opts: Mapping[str, Any], site: Any, q: torch.Tensor, k: torch.Tensor,
               inputs: Tensors) -> Tensors:
        raise NotImplementedError(self.name)

    def reference_keep(self, opts: Mapping[str, Any], site: Any, q: torch.Tensor,
                       k: torch.Tensor, inputs: Tensors) -> torch.Tensor:
        raise NotImplementedError(self.name)


Builder = Callable[[Mapping[str, Any], int, int, int, dict], BlockLayout]


@dataclass(frozen=True)
class StaticLayout(LayoutSpec):
    """A layout fixed by the geometry and options: built once on the host, registered as four
    int32 buffers (shared by sites of the same geometry), read by the op as they are."""

    builder: Builder | None = None
    per_head: bool = False  # differs per head (random blocks, mixtures)
    static: ClassVar[bool] = True

    def build(self, opts, q_len, kv_len, heads, causal, device=None):
        common = dict(block=opts["block"], causal=causal, device=device)
        return self.builder(opts, q_len, kv_len, heads if self.per_head else 1, common)

    def graph_inputs(self, opts, site, index, layout):
        key = (f"{self.name}_{layout.q_len}x{layout.kv_len}_h{layout.heads}_b{opts['block']}"
               f"{'_causal' if layout.causal else ''}").replace("-", "_")
        names = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")
        return [LayoutInput(f"{key}.{n}", t) for n, t in zip(names, layout.tensors())]

    def select(self, opts, site, q, k, inputs):
        return inputs


@dataclass(frozen=True)
class Mixture(StaticLayout):
    """Heads cycle through the static layouts listed in `mixture`."""

    per_head: bool = True

    def check(self, opts):
        bad = [n for n in opts["mixture"] if n not in STATIC_LAYOUTS or n == "mixture"]
        if not opts["mixture"] or bad:
            raise OptionError("option 'block-sparse-attention.mixture' must list static "
                              "layouts for layout = \"mixture\", e.g. [\"sliding-window\", "
                              "\"dense\"]")

    def build(self, opts, q_len, kv_len, heads, causal, device=None):
        self.check(opts)
        names = tuple(opts["mixture"])
        return stack_heads([
            KINDS[names[h % len(names)]].build({**opts, "seed": opts.get("seed", 0) + h},
                                               q_len, kv_len, 1, causal, device)
            for h in range(heads)])


@dataclass(frozen=True)
class ScoreSelection(LayoutSpec):
    """Pooled-QK block scores, then per query block the `topk` best key blocks (`threshold`:
    the fewest whose mass reaches it, at most `topk`), besides sink and window."""

    by_threshold: bool = False

    def check(self, opts):
        if self.by_threshold and opts["threshold"] <= 0:
            raise OptionError("option 'block-sparse-attention.threshold' must be > 0 for "
                              "layout \"threshold\"")
        if not self.by_threshold and opts["topk"] < 1:
            raise OptionError("option 'block-sparse-attention.topk' must be ≥ 1 for layout "
                              "\"topk\"")

    def select(self, opts, site, q, k, inputs):
        b = opts["block"]
        probs = torch.ops.sparsec.block_scores(q, k, site.scale, site.causal, b, b)
        return _select_blocks(opts, site, probs, self._threshold(opts))

    def reference_keep(self, opts, site, q, k, inputs):
        b = opts["block"]
        probs = pooled_block_scores(q, k, site.scale, site.causal, b, b)
        return _keep_from_scores(opts, site, probs, self._threshold(opts))

    def _threshold(self, opts) -> float:
        return opts["threshold"] if self.by_threshold else 0.0


@dataclass(frozen=True)
class VerticalSlash(LayoutSpec):
    """MInference's vertical-slash lines: the strongest key columns and diagonals of the
    last query block's attention, rounded to blocks, besides sink and window."""

    def select(self, opts, site, q, k, inputs):
        return torch.ops.sparsec.select_blocks_vertical_slash(
            q, k, site.scale, site.causal, opts["block"], opts["vertical"], opts["slash"],
            opts["sink"], opts["window"])

    def reference_keep(self, opts, site, q, k, inputs):
        return vertical_slash_keep(q, k, site.scale, site.causal, opts["block"],
                                   opts["vertical"], opts["slash"], opts["sink"], opts["window"])


@dataclass(frozen=True)
class LearnedGate(LayoutSpec):
    """A per-site gate (`layouts.learned`) scores key blocks; the `topk` best are kept besides
    sink and window. Its two maps are parameters of the program (trained by `sparsec
    train-gates`, or loaded from `gates`)."""

    def graph_inputs(self, opts, site, index, layout):
        wq, wk = learned_gates.init_gate(site.heads, site.kv_heads, site.head_dim,
                                         opts["gate_dim"], seed=index)
        stem = f"gates.{_safe(site.name)}"
        if opts["gates"]:
            wq, wk = _load_gate(opts["gates"], f"{PREFIX}.{stem}", wq, wk)
        return [LayoutInput(f"{stem}.wq", wq, parameter=True),
                LayoutInput(f"{stem}.wk", wk, parameter=True)]

    def select(self, opts, site, q, k, inputs):
        return _select_blocks(opts, site, self._probs(opts, site, q, k, inputs), 0.0)

    def reference_keep(self, opts, site, q, k, inputs):
        return _keep_from_scores(opts, site, self._probs(opts, site, q, k, inputs), 0.0)

    def _probs(self, opts, site, q, k, inputs) -> torch.Tensor:
        b = opts["block"]
        logits = learned_gates.gate_logits(q, k, inputs[0], inputs[1], site.scale, site.causal,
                                           b, b)
        return torch.softmax(logits, dim=-1)


def _select_blocks(opts, site, probs: torch.Tensor, threshold: float) -> Tensors:
    b = opts["block"]
    return torch.ops.sparsec.select_blocks(probs, site.q_len, site.kv_len, site.causal, b, b,
                                           opts["topk"], threshold, opts["sink"], opts["window"])


def _keep_from_scores(opts, site, probs: torch.Tensor, threshold: float) -> torch.Tensor:
    b = opts["block"]
    return select_keep(probs, site.q_len, site.kv_len, b, b, site.causal, opts["topk"],
                       threshold, opts["sink"], opts["window"])


def _load_gate(path: str, stem: str, wq: torch.Tensor, wk: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    loaded = learned_gates.load_gates(path)
    for name, t in (("wq", wq), ("wk", wk)):
        got = loaded.get(f"{stem}.{name}")
        if got is None or got.shape != t.shape:
            raise OptionError(f"gates file {path} has no {stem}.{name} of shape "
                              f"{tuple(t.shape)}; train gates for this model and options with "
                              "`sparsec train-gates`")
    return loaded[f"{stem}.wq"], loaded[f"{stem}.wk"]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name) or "site"


# the static builders: (options, q_len, kv_len, heads, common keywords) → BlockLayout ---------
def _dense(o, L, S, heads, common):
    return static.dense(L, S, **common)


def _sliding_window(o, L, S, heads, common):
    return static.sliding_window(L, S, window=o["window"], sink=o["sink"], **common)


def _strided(o, L, S, heads, common):
    return static.strided(L, S, stride=o["stride"], window=o["window"], sink=o["sink"],
                          **common)


def _dilated(o, L, S, heads, common):
    return static.dilated(L, S, window=o["window"], dilation=o["dilation"], sink=o["sink"],
                          **common)


def _bigbird(o, L, S, heads, common):
    return static.bigbird(L, S, window=o["window"], global_tokens=o["global_tokens"],
                          random_blocks=o["random_blocks"], heads=heads, seed=o["seed"],
                          **common)


KINDS: dict[str, LayoutSpec] = {k.name: k for k in (
    StaticLayout("dense", (), _dense),
    StaticLayout("sliding-window", ("window", "sink"), _sliding_window),
    StaticLayout("strided", ("stride", "window", "sink"), _strided),
    StaticLayout("dilated", ("window", "dilation", "sink"), _dilated),
    StaticLayout("bigbird", ("window", "global_tokens", "random_blocks", "seed"), _bigbird,
                 per_head=True),
    Mixture("mixture", ("mixture", "window", "sink", "stride", "dilation", "global_tokens",
                        "random_blocks", "seed")),
    ScoreSelection("topk", ("topk", "window", "sink")),
    ScoreSelection("threshold", ("threshold", "topk", "window", "sink"), by_threshold=True),
    VerticalSlash("vertical-slash", ("vertical", "slash", "window", "sink")),
    LearnedGate("learned", ("topk", "window", "sink", "gate_dim", "gates")),
)}
STATIC_LAYOUTS = tuple(n for n, k in KINDS.items() if k.static)
DYNAMIC_LAYOUTS = tuple(n for n, k in KINDS.items() if not k.static)
LAYOUTS = STATIC_LAYOUTS + DYNAMIC_LAYOUTS
LAYOUT_OPTIONS: dict[str, tuple[str, ...]] = {n: k.options for n, k in KINDS.items()}


def kind_of(name: str) -> LayoutSpec:
    return KINDS[name]


def is_static(name: str) -> bool:
    return KINDS[name].static if name in KINDS else False


def build_static(name: str, opts: Mapping[str, Any], q_len: int, kv_len: int, heads: int,
                 causal: bool, device: Any = None) -> BlockLayout:
    """The static layout `name` for one attention geometry; heads > 1 only where it varies
    per head (bigbird's random blocks, mixtures)."""
    if name not in KINDS:
        raise OptionError(f"layout '{name}' is not static; choose one of "
                          f"{', '.join(STATIC_LAYOUTS)}")
    return KINDS[name].build(opts, q_len, kv_len, heads, causal, device)

"""The `block-sparse-attention` pass: attention in the forward graph → one block-sparse op.

Every attention the matcher (`attention_match`) finds is replaced by
`sparsec::block_sparse_attention` over a layout: static layouts are registered as int32
buffers (shared by sites of the same geometry); dynamic ones are computed in the graph by the
selection ops from the site's q and k; learned ones by a gate whose parameters are registered
on the program. The report gets an `attention` section.

Two steps: `plan(sites)` decides each site's rewrite without touching the graph (`SitePlan`:
report entry, static layout); `emit(gm, plans, "fast" | "reference")` inserts the op, or —
for verification — dense attention under the same layout.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx

from ..errors import OptionError
from ..layouts.block_layout import BLOCK_SIZES, BlockLayout
from ..layouts.spec import LAYOUT_OPTIONS, LAYOUTS, PREFIX, STATIC_LAYOUTS, LayoutSpec, kind_of
from ..ops import block_select, block_sparse_attention  # noqa: F401  (register the ops)
from ..program import Program, Prop, node_info
from .attention_match import Site, SiteCall, Skip, find_sites
from .attention_reference_graph import reference_replacement
from .base import Pass, PassResult, option, register

from .rewrite import add_constant, erase_unused, insert_traced

__all__ = ["BlockSparseAttention"]

DEFAULT_BLOCK = 64  # block = 0 picks this where every site is this long


@register
@dataclass(frozen=True)
class BlockSparseAttention(Pass):
    """Rewrite every attention of the forward graph into `sparsec::block_sparse_attention`.

    Matches `scaled_dot_product_attention` and hand-written softmax attention (matmul →
    scale → mask → softmax → matmul), folds repeated keys/values back to their heads (GQA)
    and constant causal masks into causal=True; other masks (padding) stay element masks on
    top of the layout. Lengths (window, sink, stride, global_tokens) are in tokens and are
    rounded to blocks. Static layouts: dense, sliding-window, strided, dilated, bigbird,
    mixture; dynamic ones (computed from q and k on the device): topk, threshold,
    vertical-slash; learned: a per-site gate (train it with `sparsec train-gates`).
    Verification compares with dense attention under each layout's mask (`dense` is checked
    against the model itself).
    """

    name = "block-sparse-attention"
    summary = "rewrite attention into block-sparse form over a layout"
    establishes = frozenset({Prop.BLOCK_SPARSE_ATTENTION})
    exportable = True  # every layout: sparsec.ops.onnx_attention / onnx_select (docs/onnx.md)

    layout: str = option("sliding-window", "which layout", choices=LAYOUTS)
    block: int = option(0, "block size in tokens (queries and keys); 0: automatic, 64 where "
                           "every site is that long, else the largest that fits the shortest",
                        choices=(0, *BLOCK_SIZES))
    window: int = option(256, "local window in tokens (also the local part of dynamic "
                              "layouts)", min=0)
    sink: int = option(64, "first tokens every query sees (attention sinks)", min=0)
    stride: int = option(256, "strided: a summary key block every `stride` tokens", min=1)
    dilation: int = option(2, "dilated: keep every n-th key block inside the window", min=1)
    global_tokens: int = option(64, "bigbird: global tokens (rows and columns)", min=0)
    random_blocks: int = option(2, "bigbird: random key blocks per query block", min=0)
    seed: int = option(0, "seed of bigbird's random blocks")
    topk: int = option(8, "topk/learned: key blocks chosen per query block besides sink and "
                          "window; threshold: the cap (0 = none)", min=0)
    threshold: float = option(0.9, "threshold: attention mass to keep per query block",
                              min=0.0, max=1.0)
    vertical: int = option(64, "vertical-slash: key columns (tokens) kept", min=0)
    slash: int = option(64, "vertical-slash: diagonals kept", min=0)
    mixture: tuple[str, ...] = option((), "mixture: static layouts that heads cycle through")
    gate_dim: int = option(0, "learned: gate width (0 = head dim)", min=0)
    gates: str | None = option(None, "learned: safetensors file of trained gates")
    sites: tuple[str, ...] = option((), "globs of module paths to rewrite (default: all)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.spec.check(self.options())

    @property
    def spec(self) -> LayoutSpec:
        """The chosen layout's strategy: what it adds to the graph and how it selects."""
        return kind_of(self.layout)

    @classmethod
    def hypothesis_options(cls):
        """Consistent option sets for `sparsec.testing.strategies.recipes()` (short sequences
        of at least 16 tokens: blocks of 16, lengths of a few blocks)."""
        from hypothesis import strategies as st

        statics = sorted(n for n in STATIC_LAYOUTS if n != "mixture")
        return st.fixed_dictionaries({
            "layout": st.sampled_from(LAYOUTS),
            "block": st.just(16),
            "window": st.sampled_from((0, 16, 32, 64)),
            "sink": st.sampled_from((0, 16, 32)),
            "stride": st.sampled_from((16, 32, 64)),
            "dilation": st.integers(1, 3),
            "global_tokens": st.sampled_from((0, 16)),
            "random_blocks": st.integers(0, 2),
            "topk": st.integers(1, 4),
            "threshold": st.floats(0.05, 1.0),
            "mixture": st.lists(st.sampled_from(statics), min_size=1, max_size=3).map(tuple),
        })

    # pass interface -------------------------------------------------------------------------
    def run(self, program: Program) -> PassResult:
        found = find_sites(program.gm)
        sites, skipped = self._select(found)
        if self.block == 0:
            return self._with_block(sites).run(program)
        plans = self.plan(sites)
        self.emit(program.gm, plans, "fast")
        rewritten = [p.info for p in plans]
        density = self._density(program, rewritten)
        section = {"layout": self.layout, "block": self.block,
                   "options": {k: getattr(self, k) for k in LAYOUT_OPTIONS[self.layout]},
                   "sites_found": len(found), "sites_rewritten": len(sites),
                   "skipped": [{"node": s.node.name, "module": s.name, "reason": s.reason}
                               for s in skipped],
                   "density": density, "sites": rewritten}
        if density["value"] == 1.0 and self.layout != "dense":
            section["warning"] = (f"the {self.layout} layout keeps 100% of the block grid at "
                                  f"block {self.block}, so attention stays dense; use a smaller "
                                  "window or block, or leave the pass out")
        report = program.state.setdefault("report", {})
        if sites or "attention" not in report:
            report["attention"] = section
        stats = {"sites_found": len(found), "sites_rewritten": len(sites),
                 "skipped": len(skipped)}
        if density["value"] is not None:
            stats["density"] = round(density["value"], 4)
        return PassResult(modified=bool(sites), stats=stats)

    def reference(self, program: Program) -> Callable[..., Any] | None:
        """Dense attention under each site's layout. A dynamic layout's blocks are the ones
        the rewritten program selects on the example inputs (recorded from a run of it), so
        the kernel is checked under the layout it ran, and a near-tie that rounding breaks
        the other way in the reference (bf16) is no failure; the selection kernels are
        checked against their references in their own tests."""
        if self.layout == "dense":
            return None  # keep-all must reproduce the model itself
        ref = program.copy(share_tensors=True)
        sites, _ = self._select(find_sites(ref.gm))
        if self.block == 0:
            return self._with_block(sites).reference(program)
        selected = None if self.spec.static else self._selected_blocks(program)
        self.emit(ref.gm, self.plan(sites), "reference", selected)
        fn = ref.gm
        fn.reference_name = ("dense attention under each layout's element mask"
                             if not selected else
                             "dense attention under the blocks each site selected")
        return fn

    def _selected_blocks(self, program: Program) -> list[torch.Tensor]:
        """bool [B, H, NQ, NKV] per site: the blocks the rewritten program selects on the
        example inputs."""
        rewritten = program.copy(share_tensors=True)  # the pass's rewrite, run once here
        plans = self.plan(self._select(find_sites(rewritten.gm))[0])
        self.emit(rewritten.gm, plans, "fast")
        layouts = _selected_layouts(rewritten, [p.info for p in plans])
        if any(lay is None for lay in layouts):
            raise RuntimeError("a rewritten site's selected layout could not be recorded")
        return [lay.to_dense_blocks() for lay in layouts]

    def _with_block(self, sites: list[Site]) -> BlockSparseAttention:
        """This pass with `block = 0` resolved: 64 where every site is at least that long,
        else the largest supported block that fits the shortest site (16 at least)."""
        shortest = min((min(s.q_len, s.kv_len) for s in sites), default=DEFAULT_BLOCK)
        fits = [b for b in BLOCK_SIZES if b <= min(shortest, DEFAULT_BLOCK)]
        return dataclasses.replace(self, block=fits[-1] if fits else BLOCK_SIZES[0])

    # matching ------------------------------------------------------------------------------
    def _select(self, found: list[Site | Skip]) -> tuple[list[Site], list[Skip]]:
        sites, skipped = [], []
        for item in found:
            if isinstance(item, Skip):
                skipped.append(item)
            elif self.sites and not any(fnmatch.fnmatchcase(item.name, g) for g in self.sites):
                skipped.append(Skip(item.node, "not selected by the `sites` option"))
            else:
                sites.append(item)
        return sites, skipped

    def _check_lengths(self, site: Site) -> None:
        shortest = min(site.q_len, site.kv_len)
        if self.block > shortest:
            fits = [b for b in BLOCK_SIZES if b <= shortest]
            fix = f"choose block ≤ {shortest} ({', '.join(map(str, fits))})" if fits else \
                "attention this short gains nothing from block sparsity; leave it out with " \
                "the `sites` option"
            raise OptionError(f"option '{self.name}.block' is {self.block} but attention "
                              f"'{site.name}' has length {shortest}; {fix}")

    # rewriting -----------------------------------------------------------------------------
    def plan(self, sites: list[Site]) -> list[SitePlan]:
        """What each site becomes, decided without touching the graph: its report entry and,
        for a static layout, the layout (on the site's device)."""
        plans = []
        for index, site in enumerate(sites):
            self._check_lengths(site)
            info = {"node": site.node.name, "module": site.name, "kind": site.kind,
                    "q_len": site.q_len, "kv_len": site.kv_len, "heads": site.heads,
                    "kv_heads": site.kv_heads, "causal": site.causal, "gqa": site.gqa,
                    "mask": site.mask.describe(), "scale": site.scale, "softcap": site.softcap}
            layout = None
            if self.spec.static:  # built on the host, kept where the model runs
                layout = self.spec.build(self.options(), site.q_len, site.kv_len, site.heads,
                                         site.causal).to(site.q.meta["val"].device)
                info["density"] = layout.density()
            plans.append(SitePlan(site, index, info, layout))
        return plans

    def emit(self, gm: fx.GraphModule, plans: list[SitePlan], impl: str,
             selected: list[torch.Tensor] | None = None) -> None:
        """Replace each planned site in `gm` by the op (`impl` "fast") or by dense attention
        under its layout ("reference"; a dynamic layout under the blocks in `selected`)."""
        for p in plans:
            keep = selected[p.index] if selected else None
            extra = self._layout_inputs(gm, p, impl, keep)
            call = SiteCall(p.site, extra)
            fn = self._replacement(call) if impl == "fast" else \
                reference_replacement(self, call, recorded=keep is not None)
            out = insert_traced(gm, fn, call.inputs(), before=p.site.node,
                                meta_from=p.site.node, tag={"inserted_by": self.name})
            p.site.node.replace_all_uses_with(out)
            erase_unused(gm.graph, p.site.dead or [p.site.node])
            if impl == "fast":
                self._annotate(gm, out, p.site, p.info)
        gm.graph.lint()
        gm.recompile()

    def _layout_inputs(self, gm: fx.GraphModule, p: SitePlan, impl: str,
                       selected: torch.Tensor | None) -> list[fx.Node]:
        """The graph inputs a site's layout adds: for the op, what the layout's spec names (a
        static layout's tensors, a learned gate's parameters; none for a dynamic layout); for
        the reference, a static layout's element mask or the blocks a dynamic one selected."""
        if impl == "reference" and p.layout is not None:
            return [add_constant(gm, f"{PREFIX}.reference_mask_{p.index}",
                                 p.layout.to_element_mask(), p.site.node)]
        if selected is not None:
            return [add_constant(gm, f"{PREFIX}.reference_blocks_{p.index}", selected,
                                 p.site.node)]
        val = p.site.q.meta["val"]
        inputs = self.spec.graph_inputs(self.options(), p.site, p.index, p.layout)
        nodes = []
        for i in inputs:  # a floating input (a gate) takes q's dtype
            t = i.tensor.to(val.device)
            t = t.to(val.dtype) if t.is_floating_point() else t
            nodes.append(add_constant(gm, f"{PREFIX}.{i.name}", t, p.site.node,
                                      parameter=i.parameter))
        params = [n.target for n, i in zip(nodes, inputs) if i.parameter]
        if params:
            p.info["gate_params"] = params
        return nodes

    def _replacement(self, call: SiteCall) -> Callable[..., torch.Tensor]:
        """A torch function of `call.inputs()` → out."""
        site, spec, opts = call.site, self.spec, self.options()
        bsa, dtype = torch.ops.sparsec.block_sparse_attention, site.node.meta["val"].dtype

        def fn(*tensors):
            q, k, v, lay, mask = call.unpack(*tensors)
            lay = spec.select(opts, site, q, k, lay)
            out = bsa(q, k, v, *lay, mask, site.scale, site.causal, self.block, self.block,
                      site.softcap)[0]
            return site.shape_output(out, dtype)
        return fn

    def _annotate(self, gm: fx.GraphModule, out: fx.Node, site: Site,
                  info: dict[str, Any]) -> None:
        """Tag the new op node (and the gate's logits) for reports, plots and training."""
        op = _producer(out, torch.ops.sparsec.block_sparse_attention.default)
        if op is None:
            return
        meta = {"layout": self.layout, "site": site.name, "block": self.block}
        if info.get("gate_params"):
            meta["gate_params"] = info["gate_params"]
            logits = _producer(op.args[3], torch.ops.aten.masked_fill.Scalar, depth=40,
                               follow_all=True)
            meta["gate_logits"] = logits.name if logits is not None else None
        node_info(op)["attention"] = meta
        info["op_node"] = op.name

    def _density(self, program: Program, rewritten: list[dict[str, Any]]) -> dict[str, Any]:
        if not rewritten:
            return {"value": None, "of": None}
        grids = {"causal" if r["causal"] else "full" for r in rewritten}
        of = grids.pop() if len(grids) == 1 else "causal or full (per site's causality)"
        if self.spec.static:
            values, how = [r["density"] for r in rewritten], "from the layout"
        else:
            values, how = _measure_density(program, rewritten), "measured on the example inputs"
            for r, v in zip(rewritten, values):
                r["density"] = v
        return {"value": sum(values) / len(values), "of": f"{of} block grid", "how": how,
                "averaged": "over sites, batch and heads"}


@dataclass
class SitePlan:
    """One site's rewrite as `plan` decided it: the site, its position, its report entry and
    its static layout (None for dynamic and learned layouts)."""

    site: Site
    index: int
    info: dict[str, Any]
    layout: BlockLayout | None


def _producer(node: Any, target: Any, depth: int = 8, follow_all: bool = False) -> fx.Node | None:
    """The nearest ancestor of `node` (itself included) with `target`."""
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if not isinstance(n, fx.Node):
                continue
            if n.target is target:
                return n
            nxt.extend(n.all_input_nodes if follow_all else n.all_input_nodes[:1])
        frontier = nxt
    return None


def _measure_density(program: Program, rewritten: list[dict[str, Any]]) -> list[float]:
    """Each site's density under the layout it selects on the example inputs."""
    return [float("nan") if lay is None else lay.density()
            for lay in _selected_layouts(program, rewritten)]


def _selected_layouts(program: Program, rewritten: list[dict[str, Any]]
                      ) -> list[BlockLayout | None]:
    """Run the program on its example inputs and read each rewritten site's layout (as its
    block-sparse op received it; None where the op did not run)."""
    from torch.utils import _pytree as pytree

    gm = program.gm
    ops = {n.name: n for n in gm.graph.nodes if n.target is
           torch.ops.sparsec.block_sparse_attention.default}
    wanted = {ops[r["op_node"]] for r in rewritten if r.get("op_node") in ops}
    seen: dict[fx.Node, tuple] = {}

    class _Spy(fx.Interpreter):
        def run_node(self, n):
            if n in wanted:
                args, _ = self.fetch_args_kwargs_from_env(n)
                seen[n] = args
            return super().run_node(n)

    with torch.no_grad():
        _Spy(gm).run(*pytree.tree_leaves(program.example_inputs))
    out: list[BlockLayout | None] = []
    for r in rewritten:
        args = seen.get(ops.get(r.get("op_node")))
        if args is None:
            out.append(None)
            continue
        q, k = args[0], args[1]
        out.append(BlockLayout(*[t.to(torch.int32) for t in args[3:7]], q.shape[-2],
                               k.shape[-2], args[10], args[11], args[9]))
    return out


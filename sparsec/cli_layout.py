"""What `sparsec layout` and `sparsec train-gates` do, kept out of cli.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import BadInputError
from .layouts.block_layout import BlockLayout
from .layouts.plot import plot_layout
from .layouts.spec import build_static, is_static

__all__ = ["draw_layout", "site_layouts", "train_gates_file"]

_PASS_OPTIONS = ("layout", "block", "window", "sink", "stride", "dilation", "global_tokens",
                 "random_blocks", "seed", "topk", "threshold", "vertical", "slash")


def _make_pass(kw: dict[str, Any]):
    from .passes.attention import BlockSparseAttention
    from .recipe import make_pass

    opts = {k: kw[k] for k in _PASS_OPTIONS if k in kw}
    mixture = tuple(m.strip() for m in (kw.get("mixture") or "").split(",") if m.strip())
    if mixture:
        opts["mixture"] = mixture
    return make_pass(BlockSparseAttention, opts, lambda key: f"--{key.replace('_', '-')}")


def _heads(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(h) for h in text.split(",") if h.strip())
    except ValueError:
        raise BadInputError(f"--head {text!r}: give comma-separated head numbers, e.g. 0,1") \
            from None


def draw_layout(model_file: Path | None, out: Path, **kw: Any) -> str:
    """Build the layout (static from lengths, or as the pass chooses it on MODEL.py) and
    plot it. Returns the line to print."""
    from .layouts.plot import image_format

    image_format(out)  # refuse an unknown image suffix before any work
    p = _make_pass(kw)
    heads = _heads(kw.get("plot_heads") or "0")
    if model_file is None:
        if not is_static(p.layout):
            raise BadInputError(f"layout '{p.layout}' is chosen from q and k at run time; give a "
                                "MODEL.py to plot it as chosen on the model's example inputs")
        if not kw.get("seq_len"):
            raise BadInputError("give --seq-len (or a MODEL.py) to build a static layout")
        L = kw["seq_len"]
        S = kw.get("kv_len") or L
        if p.block > min(L, S):
            raise BadInputError(f"--block {p.block} is larger than the sequence ({min(L, S)}); "
                                "choose a smaller block")
        layout = build_static(p.layout, p.options(), L, S, max(kw.get("heads") or 1, 1),
                              kw.get("causal", True))
        where = "static"
    else:
        layouts = site_layouts(model_file, p)
        index = kw.get("site", 0)
        if not 0 <= index < len(layouts):
            raise BadInputError(f"--site {index}: the model has {len(layouts)} rewritten "
                                f"attention sites (0..{len(layouts) - 1})")
        where, layout = layouts[index]
    path = plot_layout(layout, out, heads=heads, title=f"{p.layout} · {where}")
    line = (f"wrote {path}: {p.layout}, L={layout.q_len}, S={layout.kv_len}, block "
            f"{layout.block_q}, density {layout.density():.1%} of the {layout.grid()} grid")
    if layout.density() >= 1.0:
        line += ("\nwarning: this layout keeps 100% of the blocks, so attention stays dense; "
                 "use a longer --seq-len or a smaller --window/--sink")
    return line


def site_layouts(model_file: Path, pass_) -> list[tuple[str, BlockLayout]]:
    """(site name, layout) of each site the pass rewrites in MODEL.py, as chosen on its
    example inputs."""
    from torch import fx
    from torch.utils import _pytree as pytree

    from .frontend import trace_file
    from .pipeline import run_passes
    from .program import node_info

    program = run_passes(trace_file(model_file), [pass_], verify=False)
    target = torch.ops.sparsec.block_sparse_attention.default
    ops = [n for n in program.gm.graph.nodes if n.target is target]
    seen: dict[fx.Node, tuple] = {}

    class _Spy(fx.Interpreter):
        def run_node(self, n):
            if n.target is target:
                seen[n] = self.fetch_args_kwargs_from_env(n)[0]
            return super().run_node(n)

    with torch.no_grad():
        _Spy(program.gm).run(*pytree.tree_leaves(program.example_inputs))
    out = []
    for n in ops:
        a = seen[n]
        lay = BlockLayout(*a[3:7], a[0].shape[-2], a[1].shape[-2], a[10], a[11], a[9])
        out.append((node_info(n).get("attention", {}).get("site", n.name), lay))
    return out


def train_gates_file(model_file: Path, recipe: Path | None, pass_args: tuple[str, ...],
                     steps: int, lr: float, out: Path, log) -> str:
    """Trace MODEL.py, run the recipe (which must use layout = "learned"), train the gates
    on the model file's batches() and write them to `out` (safetensors)."""
    from .recipe import resolve_passes
    from .frontend import trace_file
    from .pipeline import run_passes
    from .layouts.learned import gate_parameters, save_gates, train_gates

    program = run_passes(trace_file(model_file), resolve_passes(recipe, pass_args),
                         verify=False)
    if not gate_parameters(program):
        raise BadInputError("no learned gates in the program; the recipe needs "
                            "block-sparse-attention with layout = \"learned\"")
    losses = train_gates(program, None, steps=steps, lr=lr, log=log)
    save_gates(program, str(out))
    return (f"wrote {out}: {len(gate_parameters(program))} gate tensors; distillation loss "
            f"{losses[0]:.4f} → {losses[-1]:.4f} over {len(losses)} steps")

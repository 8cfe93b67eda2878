"""Heatmaps of layouts (PNG, matplotlib): people read layouts with their eyes."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

from .._util import atomic_write_bytes
from ..errors import BadInputError
from .block_layout import BlockLayout

__all__ = ["plot_layout", "IMAGE_FORMATS", "image_format"]

IMAGE_FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf", ".jpg": "jpeg", ".jpeg": "jpeg"}


def image_format(path: str | Path) -> str:
    """The format the file's suffix names (a .jpg is written as a JPEG), or a refusal."""
    p = Path(path)
    fmt = IMAGE_FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise BadInputError(f"{p}: cannot write a {p.suffix or 'suffix-less'} image; name it "
                            f"{', '.join(sorted(IMAGE_FORMATS))}")
    return fmt

# dropped, partial (masked), full
_COLORS = ("#ffffff", "#f4a259", "#3b6ea5")


def plot_layout(layout: BlockLayout, path: str | Path, *, heads: Sequence[int] = (0,),
                batch: int = 0, title: str | None = None) -> Path:
    """Write a heatmap of `layout` (one panel per head in `heads`) to `path` atomically.

    Rows are query blocks, columns key blocks; blue blocks are full, orange ones partial
    (causal diagonal, ragged tail), white ones skipped.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
        from matplotlib.patches import Patch
    except ImportError as e:
        raise BadInputError("plotting needs matplotlib: pip install 'sparsec[plot]'") from e
    kinds = layout.block_kinds().cpu()
    bad = [h for h in heads if not 0 <= h < max(kinds.shape[1], 1)]
    if bad or not 0 <= batch < kinds.shape[0]:
        raise BadInputError(f"layout has {kinds.shape[0]} batch entries and {kinds.shape[1]} "
                            f"heads; cannot plot head {bad[0] if bad else heads[0]} of batch "
                            f"{batch}")
    cols = min(len(heads), 4)
    rows = (len(heads) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.2 * rows), squeeze=False)
    cmap = ListedColormap(_COLORS)
    for ax in axes.flat:
        ax.axis("off")
    for ax, h in zip(axes.flat, heads):
        ax.axis("on")
        ax.imshow(kinds[batch, h].numpy(), cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
        ax.set_xlabel(f"key block ({layout.block_kv} tokens)")
        ax.set_ylabel(f"query block ({layout.block_q} tokens)")
        if len(heads) > 1:
            ax.set_title(f"head {h}", fontsize=9)
    head = title or "block layout"
    fig.suptitle(f"{head}\nL={layout.q_len}, S={layout.kv_len}, density "
                 f"{layout.density():.1%} of the {layout.grid()} grid", fontsize=10)
    fig.legend(handles=[Patch(color=_COLORS[2], label="full"),
                        Patch(color=_COLORS[1], label="partial (masked)"),
                        Patch(facecolor=_COLORS[0], edgecolor="#999999", label="skipped")],
               loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.5 / fig.get_figheight(), 1, 1))  # room for the legend
    buf = io.BytesIO()
    fig.savefig(buf, format=image_format(path), dpi=110)
    plt.close(fig)
    out = Path(path)
    try:
        atomic_write_bytes(out, buf.getvalue())
    except OSError as e:
        raise BadInputError(f"{out}: cannot write the plot ({e.strerror}); check the path") from e
    return out

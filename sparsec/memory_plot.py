"""`sparsec compile … --plot-memory mem.png`: the predicted memory of the graph, node by node.

The curve is `sparsec.memory.predict_timeline` (the replay that gives report.json's
`memory.predicted_peak_bytes`) plus the resident bytes; the peak is marked with its node.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import BadInputError
from .layouts.plot import IMAGE_FORMATS, image_format

__all__ = ["IMAGE_FORMATS", "check_plot_path", "plot_memory_timeline", "save_figure"]

def check_plot_path(path: Path) -> str:
    """The image format `path`'s suffix names, or a one-line refusal (before any work)."""
    fmt = image_format(path)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BadInputError("plots need matplotlib: pip install 'sparsec[plot]'") from None
    return fmt


def save_figure(fig: Any, path: Path) -> None:
    """Save in the format the suffix names (a .jpg is a JPEG), atomically."""
    import os
    import uuid

    fmt = check_plot_path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        fig.savefig(tmp, format=fmt, dpi=120)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise BadInputError(f"{path}: cannot write the image ({e.strerror or e})") from e


def plot_memory_timeline(program: Any, path: Path) -> str:
    """Draw the predicted bytes per node of the program's graph; returns a one-line summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .memory import predict_timeline, resident_bytes

    gm = program.gm
    timeline = predict_timeline(gm)
    resident = resident_bytes(gm)
    gib = [(resident + live) / 2**30 for _, live in timeline]
    peak_at = max(range(len(gib)), key=gib.__getitem__)
    step = "training step" if program.is_training_step else "forward"
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(range(len(gib)), gib, lw=1)
    ax.axhline(resident / 2**30, color="gray", ls="--", lw=0.8, label="resident")
    ax.plot([peak_at], [gib[peak_at]], "ro", label=f"peak {gib[peak_at]:.3g} GiB")
    ax.annotate(timeline[peak_at][0], (peak_at, gib[peak_at]), textcoords="offset points",
                xytext=(5, 5), fontsize=8)
    ax.set_xlabel(f"node of the {step} graph (execution order)")
    ax.set_ylabel("predicted memory (GiB)")
    ax.set_title(f"{program.source.name}: predicted memory per node")
    ax.legend(loc="upper left")
    fig.tight_layout()
    try:
        save_figure(fig, Path(path))
    finally:
        plt.close(fig)
    return (f"memory plot: {path} (peak {gib[peak_at]:.3g} GiB at {timeline[peak_at][0]}, "
            f"{len(timeline)} nodes)")

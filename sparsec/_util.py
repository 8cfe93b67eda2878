"""Small helpers shared across sparsec (no torch imports at module level beyond need)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

__all__ = ["quiet", "deepcopy", "atomic_write_bytes", "atomic_write_text", "remove_tree",
           "first_line"]

_NOISY = ("torch", "torch._dynamo", "torch.fx", "torch.export", "torch._export", "torch.onnx",
          "onnxscript")


def deepcopy(obj, memo: dict | None = None):
    """copy.deepcopy without the FutureWarning torch 2.13's pytree specs raise on copy."""
    import copy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(obj, memo)


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """Silence torch's logging, warnings and prints (export, ONNX) for a block.

    Yields the captured text so callers can show it under -v.
    """
    loggers = [logging.getLogger(n) for n in _NOISY]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), \
                contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield sink
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def remove_tree(path: str | Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), or its type name."""
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__

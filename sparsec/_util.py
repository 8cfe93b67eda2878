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
from typing import Any, Iterator

__all__ = ["quiet", "deepcopy", "atomic_write_bytes", "atomic_write_text", "remove_tree",
           "first_line", "user_frame", "read_regular_file", "safetensors_metadata",
           "load_with_header"]

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


def user_frame(e: BaseException, path: str | Path | None) -> str:
    """'name.py:LINE' of the deepest traceback frame in the user's file `path`, or ''."""
    import traceback

    if not path:
        return ""
    target = os.path.realpath(path)
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if os.path.realpath(f.filename) == target]
    return f"{Path(path).name}:{frames[-1].lineno}" if frames else ""


def read_regular_file(path: str | Path, what: str, limit: int | None = None) -> bytes:
    """The bytes of a regular file, at most `limit` of them; a device, FIFO or directory (which
    could be endless, like /dev/zero) or a larger file is refused with a one-line error."""
    import stat

    from .errors import BadInputError

    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise BadInputError(f"{p}: no such {what}") from None
    except OSError as e:
        raise BadInputError(f"{p}: cannot read the {what} ({e.strerror}); check the path") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise BadInputError(f"{p}: is {kind}; give the path of a {what}")
    if limit is not None and st.st_size > limit:
        raise BadInputError(f"{p}: is {st.st_size:,} bytes, more than a {what} can be "
                            f"({limit:,}); give the right file")
    try:
        with open(p, "rb") as f:
            data = f.read(st.st_size + 1 if limit is None else limit + 1)
    except OSError as e:
        raise BadInputError(f"{p}: cannot read the {what} ({e.strerror}); check its "
                            "permissions") from None
    if limit is not None and len(data) > limit:
        raise BadInputError(f"{p}: is larger than a {what} can be ({limit:,} bytes); give the "
                            "right file")
    return data


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's bytes (ValueError when the header is bad)."""
    import json

    n = int.from_bytes(data[:8], "little")
    if n <= 0 or n > len(data) - 8:
        raise ValueError("bad safetensors header")
    return json.loads(data[8:8 + n]).get("__metadata__", {}) or {}


def load_with_header(data: bytes, key: str) -> tuple[dict, Any]:
    """(tensors, the JSON header stored under metadata `key`, or None) of a safetensors file's
    bytes; OSError, SafetensorError, ValueError or RecursionError where they are unreadable
    (the callers turn those into their one-line errors)."""
    import json

    from safetensors.torch import load

    return load(data), json.loads(safetensors_metadata(data).get(key, "null"))

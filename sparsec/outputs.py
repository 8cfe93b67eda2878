"""Safe output directories (staged, then renamed in; only directories sparsec made may be
replaced) and the recipe.toml/report.json every compile writes beside its artifacts."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

from ._util import atomic_write_text, remove_tree
from .backends import Compiled
from .errors import BadInputError
from .passes.base import Pass
from .recipe import dump_recipe
from .report import build_report, to_json

__all__ = ["staged_output", "write_outputs", "check_output_dir", "check_dump_dir", "RunDirectory",
           "remove_stale_staging", "MARKER"]


def write_outputs(compiled: Compiled, out_dir: Path, passes: Sequence[Pass]) -> dict[str, Any]:
    """Write recipe.toml and report.json beside the backend's artifacts; return the report."""
    atomic_write_text(out_dir / "recipe.toml", dump_recipe(passes))
    compiled.artifacts["recipe.toml"] = out_dir / "recipe.toml"
    report = build_report(compiled, artifacts=["report.json"])
    atomic_write_text(out_dir / "report.json", to_json(report))
    compiled.artifacts["report.json"] = out_dir / "report.json"
    return report


MARKER = ".sparsec-output"  # in every directory sparsec writes: only those may --force replace
_STAGE = re.compile(r"^\.(?P<name>.+)\.(?:sparsec|old)-(?P<pid>\d+)-[0-9a-f]{8}$")


def check_output_dir(out_dir: str | Path, *, force: bool = False,
                     inputs: Sequence[str | Path | None] = ()) -> None:
    """Refuse an output directory before any work is done.

    Refused: the current directory or one above it; a directory that holds (or is) one of
    `inputs`; an existing path that is not a plain directory; an existing directory without
    `--force`; and, even with `--force`, one that sparsec did not write (it has no MARKER)
    unless it is empty. sparsec never deletes what it did not create.
    """
    final = Path(out_dir)
    where = _resolved(final)
    cwd = _resolved(Path.cwd())
    if where == cwd or where in cwd.parents:
        raise BadInputError(f"-o {out_dir}: is the current directory or one above it, which "
                            "sparsec would replace; give a new directory, e.g. -o out")
    for p in inputs:
        if p is not None and _inside(_resolved(Path(p)), where):
            raise BadInputError(f"-o {out_dir}: holds the input {p}, and the output directory "
                                "is replaced as a whole; write to another directory")
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise BadInputError(f"-o {out_dir}: exists and is not a directory; choose another -o "
                            "(sparsec replaces only directories it wrote)")
    if not final.exists():
        return
    marked, content = (final / MARKER).is_file(), sorted(p.name for p in final.iterdir())
    if force and (marked or not content):
        return
    if marked:
        raise BadInputError(f"{out_dir}: output directory exists; pass --force to replace it")
    if not content:
        raise BadInputError(f"{out_dir}: output directory exists (empty); pass --force to "
                            "replace it")
    shown = ", ".join(content[:3]) + (f" and {len(content) - 3} more" if len(content) > 3 else "")
    raise BadInputError(f"{out_dir}: exists and was not written by sparsec (it holds {shown}); "
                        "choose another -o (--force replaces only sparsec's own outputs)")


def _resolved(p: Path) -> Path:
    return Path(os.path.realpath(p))


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


@contextlib.contextmanager
def staged_output(out_dir: str | Path, *, force: bool = False,
                  inputs: Sequence[str | Path | None] = ()) -> Iterator[Path]:
    """A staging directory that becomes `out_dir` only if the block succeeds.

    `out_dir` must pass `check_output_dir`; it is replaced in one rename, so a failure at any
    point leaves either the old directory or nothing, never half an output.
    """
    run = RunDirectory(out_dir, force=force, inputs=inputs)
    staging = run.stage()
    try:
        yield staging
        run.commit(staging)
    except OSError as e:  # disk full, permissions, quota: the user's environment
        remove_tree(staging)
        raise _write_error(run.final, e, "writing the output failed") from e
    except BaseException:
        remove_tree(staging)
        raise


class RunDirectory:
    """An output directory written whole, as often as needed (each training checkpoint).

    Each `stage()` is a fresh hidden directory beside `out_dir`, named with this process's id
    and holding MARKER; `commit()` swaps it in atomically (Linux: renameat2 RENAME_EXCHANGE,
    so `out_dir` never stops existing once it does) and deletes what it replaced. Staging
    directories left by dead processes (kill -9, power loss) are removed on the next start.
    """

    def __init__(self, out_dir: str | Path, *, force: bool = False,
                 inputs: Sequence[str | Path | None] = ()):
        check_output_dir(out_dir, force=force, inputs=inputs)
        self.final = Path(out_dir)
        self.parent = self.final.parent if str(self.final.parent) else Path(".")
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _write_error(self.final, e, "cannot create the output directory") from e
        remove_stale_staging(self.final)

    def stage(self) -> Path:
        staging = self.parent / f".{self.final.name}.sparsec-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            staging.mkdir()
            atomic_write_text(staging / MARKER, "written by sparsec; `--force` may replace "
                              "this directory\n")
        except OSError as e:
            remove_tree(staging)
            raise _write_error(self.final, e, "cannot create the output directory") from e
        return staging

    def commit(self, staging: Path) -> None:
        try:
            _swap_in(staging, self.final)
        except OSError as e:  # disk full, permissions, quota: the user's environment
            remove_tree(staging)
            raise _write_error(self.final, e, "writing the output failed") from e


def _write_error(final: Path, e: OSError, what: str) -> BadInputError:
    return BadInputError(f"{final}: {what} ({e.strerror or e}); nothing was written: free "
                         "space, check the permissions or choose another -o")


def remove_stale_staging(final: Path) -> list[Path]:
    """Remove the staging directories of `final` whose process is gone; return them."""
    parent = final.parent if str(final.parent) else Path(".")
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _STAGE.match(p.name)
        if m and m["name"] == final.name and p.is_dir() and not p.is_symlink() \
                and (p / MARKER).is_file() and not _alive(int(m["pid"])):
            remove_tree(p)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by someone else
        return True
    return True


def _swap_in(staging: Path, final: Path) -> None:
    if not final.exists():
        os.replace(staging, final)
        return
    if _exchange(staging, final):  # final now holds the new output, staging the old one
        remove_tree(staging)
        return
    old = final.with_name(f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.replace(final, old)
    try:
        os.replace(staging, final)
    except OSError:
        os.replace(old, final)
        raise
    remove_tree(old)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # old kernel or file system
        return False
    raise OSError(err, os.strerror(err), str(b))


def check_dump_dir(dump_dir: str | Path | None, out_dir: str | Path | None) -> None:
    """Refuse a --dump-dir that is a file or overlaps the output directory."""
    if dump_dir is None:
        return
    d = Path(dump_dir)
    if d.exists() and not d.is_dir():
        raise BadInputError(f"--dump-dir {dump_dir}: exists and is not a directory; give a "
                            "directory for the graph dumps")
    if out_dir is not None and (_inside(_resolved(d), _resolved(Path(out_dir)))
                                or _inside(_resolved(Path(out_dir)), _resolved(d))):
        raise BadInputError(f"--dump-dir {dump_dir} and -o {out_dir} overlap, and the output "
                            "directory is replaced as a whole; give them separate directories")

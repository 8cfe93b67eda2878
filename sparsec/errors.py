"""Errors sparsec raises on purpose.

Every error the user can cause is a `BadInputError` (CLI exit code 2) whose message is one line
that names the problem and the fix. Everything else that sparsec detects about itself (a pass
that broke numerics, a backend that lost parity) is a `SparsecError` with exit code 1.
"""

from __future__ import annotations

__all__ = [
    "SparsecError",
    "BadInputError",
    "TraceError",
    "RecipeError",
    "OptionError",
    "PreconditionError",
    "PassError",
    "VerificationError",
    "ParityError",
]


class SparsecError(Exception):
    """Base class; `exit_code` is what the CLI returns for it."""

    exit_code = 1


class BadInputError(SparsecError):
    """The user's model, recipe, options or files are wrong (exit code 2)."""

    exit_code = 2


class TraceError(BadInputError):
    """The model cannot be traced; the message names the construct and the source line."""


class RecipeError(BadInputError):
    """A recipe or a `--pass` argument is malformed."""


class OptionError(RecipeError):
    """A pass option is unknown, of the wrong type or out of range."""


class PreconditionError(BadInputError):
    """A pass needs a graph property that no earlier pass established."""

    def __init__(self, pass_name: str, missing: set[str], providers: dict[str, list[str]],
                 removed_by: dict[str, str] | None = None):
        self.pass_name, self.missing, self.providers = pass_name, set(missing), providers
        removed_by = removed_by or {}
        parts = []
        for prop in sorted(self.missing):
            who = providers.get(prop) or []
            if prop in removed_by:  # it was there, and an earlier pass took it away
                fix = (f"the earlier pass '{removed_by[prop]}' removed it; run '{pass_name}' "
                       f"before '{removed_by[prop]}'")
            elif who:
                fix = f"run {' or '.join(repr(p) for p in who)} before it"
            else:
                fix = "no pass establishes it"
            parts.append(f"'{prop}' ({fix})")
        super().__init__(f"pass '{pass_name}' requires {', '.join(parts)}")


class PassError(SparsecError):
    """A pass raised; the message names the pass and the passes that ran before it."""

    def __init__(self, pass_name: str, before: list[str], cause: BaseException):
        self.pass_name, self.before, self.cause = pass_name, list(before), cause
        after = f" (after {', '.join(before)})" if before else " (first pass)"
        super().__init__(f"pass '{pass_name}' failed{after}: {type(cause).__name__}: {cause}")


class VerificationError(SparsecError):
    """A pass changed the program's numerics beyond the tolerance of its reference."""


class ParityError(SparsecError):
    """An exported artifact (ONNX) does not match the PyTorch program."""

"""Passes, one file per family; `base` holds Pass, PassResult and the registry."""

from .base import Pass, PassResult, get_pass, option, register, registered_passes

from . import _builtin  # noqa: E402,F401  (registers the built-in passes; after base, which they import)

__all__ = ["Pass", "PassResult", "get_pass", "option", "register", "registered_passes"]

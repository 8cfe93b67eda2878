"""Passes, one file per family; `base` holds Pass, PassResult and the registry."""

from .base import Pass, PassResult, get_pass, option, register, registered_passes

__all__ = ["Pass", "PassResult", "get_pass", "option", "register", "registered_passes"]

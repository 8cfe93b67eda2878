"""Importing this module registers every built-in pass."""

from . import attention, cleanup  # noqa: F401

__all__: list[str] = []

"""Importing this module registers every built-in pass."""

from . import attention, cleanup, joint_graph, prune_backward  # noqa: F401

__all__: list[str] = []

"""Importing this module registers every built-in pass."""

from . import attention, cleanup, joint_graph, merge_sparse, prune_backward, sparse_finetune  # noqa: F401

__all__: list[str] = []

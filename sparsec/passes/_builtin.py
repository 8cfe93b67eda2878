"""Importing this module registers every built-in pass."""

from . import (attention, cleanup, joint_graph, merge_sparse, prune_backward,  # noqa: F401
               sparse_finetune)

__all__: list[str] = []

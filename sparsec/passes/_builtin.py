"""Importing this module registers every built-in pass."""

from . import (  # noqa: F401
               attention,
               cleanup,
               joint_graph,
               merge_sparse,
               prune_backward,
               reduce_saved,
               sparse_finetune,
)

__all__: list[str] = []

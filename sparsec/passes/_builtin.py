"""Importing this module registers every built-in pass."""

from . import cleanup, merge_sparse, sparse_finetune  # noqa: F401

__all__: list[str] = []

"""Block layouts for sparse attention: one representation (`BlockLayout`, a Flex-style
block-CSR), static patterns, dynamic selectors and learned gates."""

from .block_layout import BLOCK_SIZES, BlockLayout, block_geometry, stack_heads
from .dynamic import pooled_block_scores, select_from_scores, select_vertical_slash
from .static import bigbird, dense, dilated, per_head, sliding_window, strided

__all__ = ["BlockLayout", "BLOCK_SIZES", "block_geometry", "stack_heads",
           "dense", "sliding_window", "strided", "dilated", "bigbird", "per_head",
           "pooled_block_scores", "select_from_scores", "select_vertical_slash"]

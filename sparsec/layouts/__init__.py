"""Block layouts for sparse attention: static patterns and dynamic selectors."""

__all__: list[str] = []

"""Triton kernels, one file each, with their plain-torch reference beside them."""

__all__: list[str] = []

"""The triton backend: sparsec ops on their Triton kernels, on a CUDA GPU.

Until the kernels land this backend is a stub that says so.
"""

from __future__ import annotations

from ..errors import BadInputError
from ..program import Program
from .base import Compiled, LowerOptions

__all__ = ["lower"]


def lower(program: Program, options: LowerOptions | None = None) -> Compiled:
    raise BadInputError("the triton backend is not implemented yet in this version of sparsec; "
                        "use --backend eager or --backend onnx")

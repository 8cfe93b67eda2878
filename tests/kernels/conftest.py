"""Kernel tests: on a machine without a GPU the Triton kernels run under Triton's interpreter
(on CPU tensors, at small sizes). TRITON_INTERPRET must be set before Triton is first imported
(tests/conftest.py does it); if Triton was loaded without it, say so instead of failing every
test obscurely."""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("tests/kernels need TRITON_INTERPRET=1 without a GPU: run "
                           "`TRITON_INTERPRET=1 pytest tests/kernels`")
    if "triton" in sys.modules:
        from triton.language import standard

        if type(standard.sum).__name__ != "InterpretedFunction":
            raise RuntimeError("Triton was imported before TRITON_INTERPRET=1 was set; run "
                               "`TRITON_INTERPRET=1 pytest tests/kernels`")

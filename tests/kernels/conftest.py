"""Kernel tests: on a machine without a GPU the Triton kernels run under Triton's interpreter
(on CPU tensors, at small sizes). TRITON_INTERPRET must be set before the kernels are
decorated, so it is set here, and kernel modules imported earlier in this process are
reloaded."""

from __future__ import annotations

import importlib
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    _triton = sys.modules.get("sparsec.kernels._triton")
    if _triton is not None and not _triton.interpreting():
        for name in sorted((n for n in sys.modules if n.startswith("sparsec.kernels.")),
                           key=lambda n: (not n.endswith("._triton"), "common" not in n, n)):
            importlib.reload(sys.modules[name])

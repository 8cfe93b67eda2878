"""Shared fixtures. Hypothesis profiles come from sparsec's pytest plugin."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Test tensors are tiny: one thread each keeps xdist workers (and other processes on a small
# machine) from spinning against each other, which made a 64x64 matmul take 24 ms.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# Without a GPU the Triton kernels are tested under Triton's interpreter (tests/kernels), which
# Triton reads when it is first imported — and torch._dynamo imports it — so set it first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="session")
def tiny_llama_path() -> Path:
    return EXAMPLES / "tiny_llama.py"


@pytest.fixture(scope="session")
def tiny_llama_program(tiny_llama_path):
    """The traced built-in example (copy it before mutating: run_passes does)."""
    from sparsec import trace_file

    return trace_file(tiny_llama_path)


def _run_cli(*args: str, cwd: Path | None = None, env: dict | None = None):
    import os
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "sparsec", *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, env=full_env, timeout=600)


@pytest.fixture
def run_cli():
    """`run_cli(*args, cwd=None, env=None)`: `python -m sparsec ARGS` in a subprocess."""
    return _run_cli

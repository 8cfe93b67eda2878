"""tiny_llama whose batches() can stall (for the kill -9 test): with SPARSEC_TEST_STALL_AT=K
set, fetching item K writes SPARSEC_TEST_STALL_FLAG and sleeps, so the test can kill the run
at a known step."""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import tiny_llama  # noqa: E402
from tiny_llama import example_inputs, loss, model  # noqa: E402,F401


def batches():
    stall = int(os.environ.get("SPARSEC_TEST_STALL_AT", "-1"))
    for i, b in enumerate(tiny_llama.batches(100)):
        if i == stall:
            Path(os.environ["SPARSEC_TEST_STALL_FLAG"]).write_text(str(os.getpid()))
            time.sleep(600)
        yield b

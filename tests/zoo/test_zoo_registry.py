"""The zoo registry itself: the architectures it promises, default behaviour flags, seeded
weights and batches, and losses with gradients."""

from __future__ import annotations

import pytest
import torch

from sparsec.testing import zoo

REQUIRED = {"gpt2", "bert", "roberta", "distilbert", "llama", "llama-tied", "mistral", "qwen2",
            "qwen3", "phi3", "gemma", "gemma2", "gpt-neox", "opt", "vit", "t5-encoder",
            "whisper-encoder", "modernbert", "minilm", "nanogpt", "convmlp"}
# behaviour flags a zoo entry must leave at its config class's default
FLAGS = ("use_cache", "tie_word_embeddings", "is_decoder", "add_cross_attention", "return_dict",
         "output_attentions", "output_hidden_states")
HF = [e.name for e in zoo.entries(library="transformers") if not e.real_weights]


def test_registry_has_every_architecture():
    assert REQUIRED <= set(zoo.names())
    assert zoo.get("gpt2").decoder and zoo.get("gpt2").causal
    assert zoo.get("bert").attention_mask and zoo.get("bert").pooler
    with pytest.raises(ValueError, match="no zoo model 'nope'; choose one of gpt2"):
        zoo.get("nope")


@pytest.mark.parametrize("name", HF)
def test_behaviour_flags_are_library_defaults(name):
    model = zoo.get(name).build(seq=16).model
    default = type(model.config)()
    for flag in FLAGS:
        if name == "llama-tied" and flag == "tie_word_embeddings":
            assert model.config.tie_word_embeddings is True
            continue
        if name == "t5-encoder" and flag == "use_cache":
            continue  # T5EncoderModel.__init__ itself turns the cache off
        assert getattr(model.config, flag, None) == getattr(default, flag, None), flag


@pytest.mark.parametrize("name", ["bert", "roberta", "vit", "minilm"])
def test_poolers_are_kept(name):
    assert zoo.get(name).build(seq=16).model.pooler is not None


def test_tied_entries_really_share_a_weight():
    for name in ("llama-tied", "gemma", "nanogpt", "gpt2"):
        model = zoo.get(name).build(seq=16).model
        names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
        assert len(names) > len(list(model.parameters())), name
    model = zoo.get("llama").build(seq=16).model
    assert len(list(model.named_parameters(remove_duplicate=False))) == \
        len(list(model.parameters()))


@pytest.mark.parametrize("name", ["llama", "bert", "vit", "whisper-encoder", "convmlp"])
def test_weights_do_not_depend_on_batch_or_length_and_batches_are_seeded(name):
    entry = zoo.get(name)
    a, b = entry.build(seq=16, batch=2), entry.build(seq=16, batch=3)
    for (n, p), (_, q) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(p, q), n
    assert b.example_inputs[0].shape[0] == 3
    first = [x for batch in a.batches(steps=2) for x in batch]
    again = [x for batch in a.batches(steps=2) for x in batch]
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    other = [x for batch in a.batches(steps=2, seed=1) for x in batch]
    assert not all(torch.equal(x, y) for x, y in zip(first, other))


@pytest.mark.parametrize("name", zoo.names())
def test_loss_is_finite_and_reaches_trainable_weights(name):
    m = zoo.get(name).build(seq=16)
    model, batch = m.model.train(), next(m.batches())
    loss = m.loss(model(*batch[:len(m.example_inputs)]), batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_builder_call_form():
    model, inputs = zoo.get("nanogpt")("cpu", torch.float64, 16, 3)
    assert inputs[0].shape == (3, 16) and next(model.parameters()).dtype == torch.float64
    assert model(*inputs).shape == (3, 16, 256)

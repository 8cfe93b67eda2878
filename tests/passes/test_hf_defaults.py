"""Unmodified HF models with their library defaults (issue 16, classes 1, 2, 3, 5, 7a, 8): each
test fails without its fix."""

from __future__ import annotations

import math

import pytest
import torch

import sparsec
from sparsec.passes.attention import BlockSparseAttention
from sparsec.testing import check_pass

T = pytest.importorskip("transformers")


def _ids(vocab: int, batch: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))


def _passes(*args: str) -> list:
    return [sparsec.parse_pass_arg(a) for a in args]


def _small(cls, **kw):
    torch.manual_seed(0)
    return cls(**kw)


def test_gpt2_with_default_use_cache_traces_and_says_so():
    cfg = _small(T.GPT2Config, n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64)
    assert cfg.use_cache  # the library default: the model returns a DynamicCache
    model = T.GPT2Model(cfg).eval()
    program = sparsec.trace(model, (_ids(64),))
    notes = program.state["report"]["trace"]["notes"]
    assert any("use_cache" in n for n in notes), notes
    assert model.config.use_cache  # restored after tracing
    want = model(_ids(64), use_cache=False).last_hidden_state
    got = program.gm(_ids(64))
    got = getattr(got, "last_hidden_state", got)
    torch.testing.assert_close(got, want)


def test_gpt2_conv1d_is_a_finetune_target():
    cfg = _small(T.GPT2Config, n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64,
                 use_cache=False)
    program = sparsec.trace(T.GPT2Model(cfg).eval(), (_ids(64),))
    out = sparsec.run_passes(program, _passes("sparse-finetune:method=delta,density=0.1,"
                                              "targets=h.0.attn.c_attn"))
    assert out.history[-1].stats["rewritten"] == 1
    assert program.state["transposed_weights"]  # Conv1D's [in, out] stored as [out, in]
    everything = sparsec.run_passes(sparsec.trace(T.GPT2Model(cfg).eval(), (_ids(64),)),
                                    _passes("sparse-finetune:method=delta,density=0.1"))
    assert everything.history[-1].stats["rewritten"] == 4  # c_attn, c_proj, c_fc, mlp.c_proj


def _loss_on_hidden(out, batch):
    hidden = getattr(out, "last_hidden_state", None)
    hidden = hidden if hidden is not None else out[0]
    return hidden.float().pow(2).mean()


def test_joint_graph_freezes_the_unreached_pooler():
    cfg = _small(T.BertConfig, num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                 intermediate_size=64, vocab_size=64, max_position_embeddings=64)
    program = sparsec.trace(T.BertModel(cfg).eval(), (_ids(64),))
    program.source.loss = _loss_on_hidden
    program.source.batches = lambda: iter([(_ids(64),)] * 4)
    out = sparsec.run_passes(program, _passes("joint-graph:lr=0.001"))
    untrained = out.state["report"]["joint"]["untrained"]
    assert any("pooler" in n for n in untrained), untrained


def test_tied_embeddings_train_once():
    cfg = _small(T.LlamaConfig, num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                 num_key_value_heads=1, intermediate_size=64, vocab_size=64,
                 tie_word_embeddings=True, use_cache=False)
    model = T.LlamaForCausalLM(cfg).eval()
    program = sparsec.trace(model, (_ids(64),))
    tied = program.state["report"]["trace"]["tied"]
    assert tied and any("lm_head" in k or "lm_head" in str(v) for k, v in tied.items()), tied
    names = [n for n, _ in program.gm.named_parameters()]
    assert len(names) == len({id(p) for p in model.parameters()})  # one tensor, one name
    program.source.loss = lambda out, batch: torch.nn.functional.cross_entropy(
        getattr(out, "logits", out).flatten(0, 1).float(),
        batch[0].flatten())
    program.source.batches = lambda: iter([(_ids(64),)] * 4)
    sparsec.run_passes(program, _passes("joint-graph:lr=0.001"))


class _HandWritten(torch.nn.Module):
    """nanoGPT-style attention with the causal mask in one of the forms models use."""

    def __init__(self, form: str, d: int = 32, heads: int = 2, block: int = 64):
        super().__init__()
        self.qkv, self.heads, self.form = torch.nn.Linear(d, 3 * d), heads, form
        self.register_buffer("bias", torch.tril(torch.ones(block, block)).view(1, 1, block, block))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, 2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        if self.form == "eq0":
            att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        elif self.form == "triu":
            att = att.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
        elif self.form == "additive":
            att = att + torch.full((t, t), torch.finfo(att.dtype).min).triu(1)
        elif self.form == "keep":
            keep = torch.tril(torch.ones(t, t, dtype=torch.bool)).expand(b, 1, t, t)
            att = att.masked_fill(~keep, -1e9)
        return (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c)


@pytest.mark.parametrize("form", ["eq0", "triu", "additive", "keep"])
def test_constant_causal_masks_fold_to_causal(form):
    torch.manual_seed(0)
    program = sparsec.trace(_HandWritten(form), (torch.randn(2, 40, 32),))
    result = check_pass(BlockSparseAttention(layout="dense", block=16), program)
    site = result.program.state["report"]["attention"]["sites"][0]
    assert site["causal"] is True and site["mask"] == "none", site


def test_block_defaults_to_one_that_fits_and_warns_at_full_grid():
    torch.manual_seed(0)
    program = sparsec.trace(_HandWritten("eq0"), (torch.randn(2, 32, 32),))
    out = sparsec.run_passes(program, [BlockSparseAttention()])  # block 64 would not fit 32
    section = out.state["report"]["attention"]
    assert section["block"] == 32
    assert "100%" in section["warning"]
    long = sparsec.trace(_HandWritten("eq0", block=128), (torch.randn(1, 128, 32),))
    assert sparsec.run_passes(long, [BlockSparseAttention()]).state["report"]["attention"][
        "block"] == 64


def test_onnx_two_inputs_share_one_batch_axis(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    cfg = _small(T.BertConfig, num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                 intermediate_size=64, vocab_size=64, max_position_embeddings=64)
    model = T.BertModel(cfg).eval()
    ids = _ids(64)
    mask = torch.ones_like(ids)
    compiled = sparsec.compile(model, (ids, mask), backend="onnx", out_dir=tmp_path / "o")
    assert compiled.report["onnx"]["dynamic_axes"]["input_ids"]["0"] == "batch"
    session = ort.InferenceSession(str(tmp_path / "o" / "model.onnx"))
    ids3, mask3 = _ids(64, batch=3), torch.ones(3, 16, dtype=torch.long)
    feeds = dict(zip([i.name for i in session.get_inputs()], (ids3.numpy(), mask3.numpy())))
    got = session.run(None, feeds)[0]
    want = model(ids3, attention_mask=mask3).last_hidden_state
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=1e-4)

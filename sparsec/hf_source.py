"""A Hugging Face checkpoint directory as a model source, in place of a model.py.

A directory with `config.json` and its weights (`*.safetensors`), and optionally tokenizer
files, is loaded with transformers' `from_pretrained(local_files_only=True)`: nothing is
fetched from a hub, and safetensors weights are never unpickled. `task` chooses the head and
the built-in loss:

| task | loaded with | output | loss |
|---|---|---|---|
| causal-lm | AutoModelForCausalLM (use_cache=False) | logits | next-token cross-entropy |
| masked-lm | AutoModelForMaskedLM | logits | cross-entropy on the masked tokens |
| sequence-classification | AutoModelForSequenceClassification | logits | cross-entropy on `label` |
| embedding | AutoModel | last_hidden_state | in-batch contrastive (InfoNCE) of mean-pooled pairs |

Without `task` it is read from the config's `architectures` (…ForCausalLM → causal-lm, and
so on; anything else → embedding).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .data import IGNORE, TASKS
from .errors import BadInputError

__all__ = ["HFTaskModel", "is_hf_dir", "load_hf_dir", "infer_task", "example_inputs_for",
           "task_loss", "find_pretrained", "OUTPUT_NAMES"]

OUTPUT_NAMES = {"causal-lm": "logits", "masked-lm": "logits",
                "sequence-classification": "logits", "embedding": "last_hidden_state"}
_AUTO = {"causal-lm": "AutoModelForCausalLM", "masked-lm": "AutoModelForMaskedLM",
         "sequence-classification": "AutoModelForSequenceClassification",
         "embedding": "AutoModel"}
_SUFFIXES = {"ForCausalLM": "causal-lm", "LMHeadModel": "causal-lm",
             "ForMaskedLM": "masked-lm", "ForSequenceClassification": "sequence-classification"}
SAMPLE_TEXT = ("Sparse fine-tuning trains a small set of chosen weights and leaves the rest as "
               "they were. A compiler that sees the whole graph can prove each rewrite against "
               "the model it came from. ")
TEMPERATURE = 0.05  # embedding: the contrastive loss's softmax temperature


class HFTaskModel(torch.nn.Module):
    """A transformers model with one tensor output: its logits or its last hidden state."""

    def __init__(self, model: torch.nn.Module, task: str):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return getattr(out, OUTPUT_NAMES[self.task])


def is_hf_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def infer_task(config: Any) -> str:
    for arch in getattr(config, "architectures", None) or []:
        for suffix, task in _SUFFIXES.items():
            if arch.endswith(suffix):
                return task
    return "embedding"


def load_hf_dir(path: str | Path, task: str | None = None) -> tuple[HFTaskModel, Any, str]:
    """(model with the task's head, tokenizer or None, task) from a local checkpoint dir."""
    p = _check_dir(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: local_files_only below
    import transformers

    transformers.utils.logging.disable_progress_bar()  # sparsec shows its own status
    try:
        config = transformers.AutoConfig.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise BadInputError(f"{p}/config.json: transformers cannot read it "
                            f"({type(e).__name__}: {_first(e)})") from None
    task = task or infer_task(config)
    if task not in TASKS:
        raise BadInputError(f"unknown --task {task!r}; choose one of {', '.join(TASKS)}")
    auto = getattr(transformers, _AUTO[task])
    kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": True}
    if task == "causal-lm":
        kwargs["use_cache"] = False  # a traced forward returns the logits, not a cache
    model = _from_pretrained(auto, p, task, kwargs)
    return HFTaskModel(model.eval(), task), _tokenizer(p), task


def _check_dir(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise BadInputError(f"{p}: not a directory; give an HF checkpoint directory")
    if not (p / "config.json").is_file():
        raise BadInputError(f"{p}: no config.json; an HF checkpoint directory holds config.json "
                            "and *.safetensors (save_pretrained writes them)")
    if not list(p.glob("*.safetensors")):
        raise BadInputError(f"{p}: no *.safetensors weights; sparsec loads safetensors only "
                            "(never pickled .bin files): save the model with safe_serialization")
    return p


def _from_pretrained(auto: Any, p: Path, task: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    errors = []
    for attn in ("sdpa", None):  # SDPA keeps attention one node; some models lack it
        extra = {"attn_implementation": attn} if attn else {}
        try:
            return auto.from_pretrained(p, **kwargs, **extra)
        except (ValueError, OSError, KeyError, TypeError) as e:
            errors.append(e)
    e = errors[-1]
    raise BadInputError(f"{p}: cannot load it for {task} ({type(e).__name__}: {_first(e)}); "
                        "check --task and the directory's files") from None


def _tokenizer(p: Path) -> Any:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
    if not any((p / n).exists() for n in names):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise BadInputError(f"{p}: cannot load its tokenizer ({type(e).__name__}: {_first(e)})"
                            ) from None


def _first(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0]


# example inputs and losses ---------------------------------------------------------------------
def example_inputs_for(model: HFTaskModel, tokenizer: Any, task: str, seq_len: int | None,
                       batch_size: int | None) -> tuple[torch.Tensor, ...]:
    """Inputs to trace with: the tokenizer on a sample text, or random ids of `seq_len`."""
    batch = batch_size or 2
    if tokenizer is None:
        if seq_len is None:
            raise BadInputError("the directory has no tokenizer files; give --seq-len (and "
                                "--batch-size) to trace with random token ids")
        vocab = int(model.model.config.vocab_size)
        ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    else:
        length = seq_len or 32
        text = tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
        if not text:
            raise BadInputError("the tokenizer turns the sample text into no tokens")
        stream = (text * (length * batch // len(text) + 1))[:length * batch]
        ids = torch.tensor(stream, dtype=torch.long).view(batch, length)
    if task in ("causal-lm", "masked-lm"):
        return (ids,)
    return ids, torch.ones_like(ids)


def task_loss(task: str):
    """The built-in loss(output, batch) of a task (batches as sparsec.data makes them)."""
    return {"causal-lm": causal_lm_loss, "masked-lm": masked_lm_loss,
            "sequence-classification": classification_loss, "embedding": contrastive_loss}[task]


def causal_lm_loss(logits: torch.Tensor, batch: tuple) -> torch.Tensor:
    """Next-token cross-entropy; positions labelled -100 (prompts) take no loss."""
    labels = batch[-1] if len(batch) > 1 else batch[0]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           labels[:, 1:].reshape(-1), ignore_index=IGNORE)


def masked_lm_loss(logits: torch.Tensor, batch: tuple) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                           batch[-1].reshape(-1), ignore_index=IGNORE)


def classification_loss(logits: torch.Tensor, batch: tuple) -> torch.Tensor:
    return F.cross_entropy(logits.float(), batch[-1].reshape(-1))


def contrastive_loss(hidden: torch.Tensor, batch: tuple) -> torch.Tensor:
    """InfoNCE over the batch: row i of the first half should match row i of the second."""
    mask = batch[1].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
    pooled = F.normalize(pooled.float(), dim=-1)
    half = pooled.shape[0] // 2
    sim = pooled[:half] @ pooled[half:].T / TEMPERATURE
    return F.cross_entropy(sim, torch.arange(half, device=sim.device))


def find_pretrained(module: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    """(prefix, the outermost transformers PreTrainedModel inside `module`), or None."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return None
    for name, sub in module.named_modules():
        if isinstance(sub, PreTrainedModel):
            return (f"{name}." if name else ""), sub
    return None

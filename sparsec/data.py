"""Training data from files: plain text, JSON lines and tokenized shards, packed into batches.

    batches = make_batches("train.jsonl", DataOptions(task="causal-lm", seq_len=128,
                                                     batch_size=4), tokenizer)
    for batch in batches(): ...          # each call is one epoch, reshuffled

Formats, by file suffix:

- `.txt` (any other suffix too): plain text, one document per line;
- `.jsonl`: one JSON object per line: `{"text": ...}`, or `{"prompt": ..., "completion": ...}`
  (the loss covers the completion only); `{"text", "label"}` for sequence-classification;
  `{"anchor", "positive"}` for embedding;
- `.safetensors` / `.npy`: token ids already tokenized, an integer tensor (named `input_ids`
  in safetensors, or the file's only tensor), 1-D (a token stream) or 2-D (rows, flattened
  into the stream); an optional same-shaped `labels` tensor (-100 where no loss is taken).

Files are never read whole: text and JSON lines are streamed line by line (tokenized as they
come, shuffled within a seeded buffer of packed sequences) and shards are memory-mapped
(`np.load(mmap_mode="r", allow_pickle=False)`, safetensors' `safe_open`), their sequences
visited in a seeded random order.

Batches are tuples: the model's inputs first, then the labels the built-in losses read:
causal-lm and masked-lm `(input_ids, labels)`, sequence-classification
`(input_ids, attention_mask, labels)`, embedding `(input_ids, attention_mask)` with the
anchors in the first half of the rows and their positives in the second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .errors import BadInputError

__all__ = ["DataOptions", "TASKS", "IGNORE", "make_batches", "token_stream", "SHUFFLE_BUFFER"]

TASKS = ("causal-lm", "masked-lm", "sequence-classification", "embedding")
IGNORE = -100  # the label of positions without loss (torch's cross_entropy ignore_index)
SHUFFLE_BUFFER = 1024  # packed sequences held at once when shuffling a streamed file
_SHARDS = (".safetensors", ".npy")


@dataclass(frozen=True)
class DataOptions:
    """How a data file becomes batches."""

    task: str = "causal-lm"
    seq_len: int = 128
    batch_size: int = 2
    seed: int = 0
    shuffle: bool = True
    mask_fraction: float = 0.15  # masked-lm: tokens replaced by the mask token


def make_batches(path: str | Path, opts: DataOptions, tokenizer: Any = None
                 ) -> Callable[[], Iterator[tuple[torch.Tensor, ...]]]:
    """A callable yielding one epoch of batches per call (a new shuffle each epoch).

    Checks the file up front (exists, readable format, enough tokens for one batch), so a
    bad file fails before any compile."""
    p = _check_path(path)
    if opts.task not in TASKS:
        raise BadInputError(f"unknown task {opts.task!r}; choose one of {', '.join(TASKS)}")
    if p.suffix not in _SHARDS and tokenizer is None:
        raise BadInputError(f"{p}: text data needs a tokenizer; give an HF checkpoint directory "
                            "with tokenizer files, or tokenize it into a .safetensors/.npy shard")
    if opts.task in ("sequence-classification", "embedding") and p.suffix in _SHARDS:
        raise BadInputError(f"{p}: {opts.task} reads JSON lines ({_FIELDS[opts.task]}); "
                            "shards hold token streams for causal-lm and masked-lm")
    epoch = [0]

    def batches() -> Iterator[tuple[torch.Tensor, ...]]:
        seed = opts.seed + epoch[0]
        epoch[0] += 1
        return _batches(p, opts, tokenizer, seed)

    first = next(_batches(p, opts, tokenizer, opts.seed), None)
    if first is None:
        raise BadInputError(f"{p}: too little data for one batch of {opts.batch_size} x "
                            f"{opts.seq_len} tokens; add data or lower --batch-size/--seq-len")
    return batches


_FIELDS = {"sequence-classification": '"text" and "label"', "embedding": '"anchor" and "positive"'}


def _check_path(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise BadInputError(f"{p}: no such data file")
    if p.is_dir():
        raise BadInputError(f"{p}: is a directory; give a .txt, .jsonl, .safetensors or .npy file")
    return p


def _batches(p: Path, opts: DataOptions, tokenizer: Any, seed: int
             ) -> Iterator[tuple[torch.Tensor, ...]]:
    rng = np.random.default_rng(seed)
    if opts.task == "sequence-classification":
        rows = _shuffled(_classification_rows(p, opts, tokenizer), opts, rng)
        return _stack(rows, opts.batch_size)
    if opts.task == "embedding":
        rows = _shuffled(_pair_rows(p, opts, tokenizer), opts, rng)
        return _pairs(rows, opts.batch_size)
    if p.suffix in _SHARDS:
        seqs = _shard_sequences(p, opts.seq_len, rng if opts.shuffle else None)
    else:
        seqs = _shuffled(_pack(token_stream(p, tokenizer), opts.seq_len), opts, rng)
    batches = _stack(seqs, opts.batch_size)
    if opts.task == "masked-lm":
        return _masked(batches, tokenizer, opts.mask_fraction, seed)
    return batches


# token streams ------------------------------------------------------------------------------
def token_stream(p: Path, tokenizer: Any) -> Iterator[tuple[list[int], list[bool]]]:
    """(ids, loss mask) per document of a text or JSON lines file, tokenized as read."""
    eos = getattr(tokenizer, "eos_token_id", None)
    tail = [eos] if eos is not None else []
    for lineno, line in _lines(p):
        if p.suffix == ".jsonl":
            obj = _json(p, lineno, line)
            if "prompt" in obj and "completion" in obj:
                prompt = _encode(tokenizer, _field(p, lineno, obj, "prompt"))
                done = _encode(tokenizer, _field(p, lineno, obj, "completion")) + tail
                yield prompt + done, [False] * len(prompt) + [True] * len(done)
                continue
            text = _field(p, lineno, obj, "text")
        else:
            text = line.rstrip("\n")
        ids = _encode(tokenizer, text) + tail
        yield ids, [True] * len(ids)


def _lines(p: Path) -> Iterator[tuple[int, str]]:
    try:
        with p.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    yield lineno, line
    except UnicodeDecodeError as e:
        raise BadInputError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); give text, "
                            "JSON lines, or a .safetensors/.npy shard") from None


def _json(p: Path, lineno: int, line: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadInputError(f"{p}:{lineno}: not JSON ({e.msg}); write one object per line"
                            ) from None
    if not isinstance(obj, dict):
        raise BadInputError(f"{p}:{lineno}: a JSON {type(obj).__name__}, not an object")
    return obj


def _field(p: Path, lineno: int, obj: dict[str, Any], key: str) -> Any:
    if key not in obj:
        have = ", ".join(sorted(obj)) or "none"
        raise BadInputError(f"{p}:{lineno}: no {key!r} field (fields: {have}); write "
                            '"text", or "prompt" and "completion"')
    return obj[key]


def _encode(tokenizer: Any, text: Any) -> list[int]:
    if not isinstance(text, str):
        raise BadInputError(f"expected a string to tokenize, got {type(text).__name__}")
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _pack(docs: Iterator[tuple[list[int], list[bool]]], seq_len: int
          ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Concatenate documents and cut them into (input_ids, labels) rows of seq_len."""
    ids: list[int] = []
    keep: list[bool] = []
    for doc_ids, doc_keep in docs:
        ids += doc_ids
        keep += doc_keep
        while len(ids) >= seq_len:
            yield _row(ids[:seq_len], keep[:seq_len])
            ids, keep = ids[seq_len:], keep[seq_len:]


def _row(ids: list[int], keep: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.tensor(ids, dtype=torch.long)
    labels = torch.where(torch.tensor(keep), x, torch.full_like(x, IGNORE))
    return x, labels


# shards -------------------------------------------------------------------------------------
def _shard_sequences(p: Path, seq_len: int, rng: np.random.Generator | None
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    ids, labels = _open_shard(p)
    n = len(ids) // seq_len
    order = rng.permutation(n) if rng is not None else range(n)
    for i in order:
        s = slice(int(i) * seq_len, (int(i) + 1) * seq_len)
        x = torch.from_numpy(np.array(ids[s], dtype=np.int64))
        y = x.clone() if labels is None else torch.from_numpy(np.array(labels[s], dtype=np.int64))
        yield x, y


class _Flat:
    """A 2-D (rows, cols) memory-mapped array read as one flat token stream."""

    def __init__(self, get: Callable[[slice], np.ndarray], rows: int, cols: int):
        self.get, self.rows, self.cols = get, rows, cols

    def __len__(self) -> int:
        return self.rows * self.cols

    def __getitem__(self, s: slice) -> np.ndarray:
        first, last = s.start // self.cols, (s.stop - 1) // self.cols
        block = np.asarray(self.get(slice(first, last + 1))).reshape(-1)
        off = first * self.cols
        return block[s.start - off:s.stop - off]


def _open_shard(p: Path) -> tuple[Any, Any]:
    if p.suffix == ".npy":
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise BadInputError(f"{p}: not a readable .npy array ({first_line(e)})") from None
        return _as_stream(p, arr, "the array"), None
    return _open_safetensors(p)


def _open_safetensors(p: Path) -> tuple[Any, Any]:
    from safetensors import SafetensorError, safe_open

    try:
        f = safe_open(str(p), framework="np")
        keys = list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise BadInputError(f"{p}: not a readable safetensors file ({first_line(e)})") from None
    name = "input_ids" if "input_ids" in keys else (keys[0] if len(keys) == 1 else None)
    if name is None:
        raise BadInputError(f"{p}: holds {', '.join(keys) or 'no tensors'}; name the token "
                            "ids `input_ids`")
    ids = _sliced(p, f, name)
    labels = _sliced(p, f, "labels") if "labels" in keys else None
    if labels is not None and len(labels) != len(ids):
        raise BadInputError(f"{p}: labels and input_ids differ in length")
    return ids, labels


def _sliced(p: Path, f: Any, name: str) -> Any:
    sl = f.get_slice(name)
    shape, dtype = sl.get_shape(), sl.get_dtype()
    if not dtype.startswith(("I", "U")) or len(shape) not in (1, 2):
        raise BadInputError(f"{p}: {name} is {dtype} {shape}; token ids are an integer "
                            "tensor of 1 or 2 dimensions")
    if len(shape) == 1:
        return _Stream1d(sl, shape[0])
    return _Flat(lambda s: sl[s], shape[0], shape[1])


class _Stream1d:
    def __init__(self, sl: Any, n: int):
        self.sl, self.n = sl, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, s: slice) -> np.ndarray:
        return self.sl[s]


def _as_stream(p: Path, arr: np.ndarray, what: str) -> Any:
    if arr.dtype.kind not in "iu" or arr.ndim not in (1, 2):
        raise BadInputError(f"{p}: {what} is {arr.dtype} with {arr.ndim} dimensions; token "
                            "ids are integers in 1 or 2 dimensions")
    if arr.ndim == 1:
        return arr
    return _Flat(lambda s: arr[s], arr.shape[0], arr.shape[1])


def first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


# rows -> batches -------------------------------------------------------------------------------
def _shuffled(rows: Iterator[Any], opts: DataOptions, rng: np.random.Generator) -> Iterator[Any]:
    """A seeded shuffle of a stream within a buffer of SHUFFLE_BUFFER rows."""
    if not opts.shuffle:
        yield from rows
        return
    buf: list[Any] = []
    for row in rows:
        buf.append(row)
        if len(buf) >= SHUFFLE_BUFFER:
            yield buf.pop(int(rng.integers(len(buf))))
    rng.shuffle(buf)
    yield from buf


def _stack(rows: Iterator[tuple[torch.Tensor, ...]], batch_size: int
           ) -> Iterator[tuple[torch.Tensor, ...]]:
    group: list[tuple[torch.Tensor, ...]] = []
    for row in rows:
        group.append(row)
        if len(group) == batch_size:
            yield tuple(torch.stack(col) for col in zip(*group))
            group = []


def _masked(batches: Iterator[tuple[torch.Tensor, ...]], tokenizer: Any, fraction: float,
            seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    mask_id = getattr(tokenizer, "mask_token_id", None)
    if mask_id is None:
        raise BadInputError("masked-lm needs a tokenizer with a mask token")
    g = torch.Generator().manual_seed(seed)
    for ids, _ in batches:
        chosen = torch.rand(ids.shape, generator=g) < fraction
        chosen[..., 0] |= ~chosen.any(-1)  # every row keeps one masked position
        yield torch.where(chosen, mask_id, ids), torch.where(chosen, ids, IGNORE)


def _padded(tokenizer: Any, text: Any, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(text, str):
        raise BadInputError(f"expected a string to tokenize, got {type(text).__name__}")
    enc = tokenizer(text, max_length=seq_len, truncation=True, padding="max_length")
    return (torch.tensor(enc["input_ids"], dtype=torch.long),
            torch.tensor(enc["attention_mask"], dtype=torch.long))


def _classification_rows(p: Path, opts: DataOptions, tokenizer: Any
                         ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    for lineno, line in _lines(p):
        obj = _json(p, lineno, line)
        label = _field(p, lineno, obj, "label")
        if not isinstance(label, int) or isinstance(label, bool):
            raise BadInputError(f"{p}:{lineno}: label {label!r} is not an integer class id")
        ids, mask = _padded(tokenizer, _field(p, lineno, obj, "text"), opts.seq_len)
        yield ids, mask, torch.tensor(label)


def _pair_rows(p: Path, opts: DataOptions, tokenizer: Any) -> Iterator[tuple[torch.Tensor, ...]]:
    for lineno, line in _lines(p):
        obj = _json(p, lineno, line)
        a = _padded(tokenizer, _field(p, lineno, obj, "anchor"), opts.seq_len)
        b = _padded(tokenizer, _field(p, lineno, obj, "positive"), opts.seq_len)
        yield (*a, *b)


def _pairs(rows: Iterator[tuple[torch.Tensor, ...]], batch_size: int
           ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if batch_size % 2:
        raise BadInputError(f"embedding batches hold anchor/positive pairs: --batch-size "
                            f"{batch_size} must be even")
    for a_ids, a_mask, b_ids, b_mask in _stack(rows, batch_size // 2):
        yield torch.cat([a_ids, b_ids]), torch.cat([a_mask, b_mask])

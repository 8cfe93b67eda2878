"""The "who did it" task for tools/bench_quality.py: find the agent of the main verb.

Sentences about 16 animals in nine syntactic frames (active, passive, relative clauses with a
distracting third animal that is sometimes itself an agent, clefts, contrast); the label is the
animal that performs the main verb's action (16 classes). A bag of words cannot solve it (two
or three animals appear in every sentence, in either order), so a linear probe on mean-pooled
frozen sentence embeddings stays far below a fine-tuned encoder, which must read the syntax.
Fully deterministic for a seed; train, validation and test sentences are disjoint.
"""

from __future__ import annotations

import random

__all__ = ["ANIMALS", "VERBS", "FRAMES", "make_task"]

ANIMALS = ("cat", "dog", "fox", "owl", "horse", "bear", "wolf", "lion", "tiger", "rabbit",
           "mouse", "snake", "goat", "duck", "frog", "deer")
VERBS = ("chased", "bit", "saw", "followed", "pushed", "kicked", "helped", "watched", "called",
         "found", "pulled", "fed")
# {a}: agent of the main verb (the label), {b}: its patient, {c}: a distractor.
FRAMES = (
    "the {a} {v} the {b}.",
    "the {b} was {v} by the {a}.",
    "the {a} that the {c} {w} {v} the {b}.",
    "the {b} that the {c} {w} was {v} by the {a}.",
    "it was the {a} who {v} the {b}.",
    "the {b}, not the {c}, was {v} by the {a}.",
    "the {b} that {w} the {c} was {v} by the {a}.",
    "the {a} that was {w} by the {c} {v} the {b}.",
    "the {b} was {v} by the {a} that the {c} {w}.",
)


def make_task(seed: int = 0, n_train: int = 2048, n_val: int = 512,
              n_test: int = 1024) -> dict[str, list[tuple[str, int]]]:
    """Disjoint splits of (sentence, label) pairs."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[tuple[str, int]] = []
    total = n_train + n_val + n_test
    while len(out) < total:
        a, b, c = rng.sample(range(len(ANIMALS)), 3)
        v, w = rng.sample(VERBS, 2)
        text = rng.choice(FRAMES).format(a=ANIMALS[a], b=ANIMALS[b], c=ANIMALS[c], v=v, w=w)
        if text not in seen:
            seen.add(text)
            out.append((text, a))
    return {"train": out[:n_train], "val": out[n_train:n_train + n_val],
            "test": out[n_train + n_val:]}

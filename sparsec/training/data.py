"""The stream of training batches: model.py's `batches()` cycled, one rank's share of it, and
what a batch holds (rows and tokens, for the statistics and the checkpoint's progress)."""

from __future__ import annotations

import inspect
import itertools
from typing import Any, Callable, Iterable, Iterator

import torch

from .._util import first_line, user_frame
from ..errors import BadInputError, SparsecError

__all__ = ["cycle_batches", "sharded_batches", "batch_rows", "batch_tokens"]


def cycle_batches(batches: Callable[[], Iterable[Any]] | Iterable[Any]) -> Iterator[Any]:
    """The batches over and over (a callable is called again when it runs out)."""
    while True:
        empty = True
        for batch in _guarded(batches):
            empty = False
            yield batch
        if empty:
            raise BadInputError("batches() yielded no batch; it must yield at least one")
        if not callable(batches):
            return


def _guarded(batches: Callable[[], Iterable[Any]] | Iterable[Any]) -> Iterator[Any]:
    """The items of batches(), its errors as one-line BadInputErrors."""
    def fail(e: Exception) -> BadInputError:
        user = inspect.unwrap(batches) if callable(batches) else batches
        path = getattr(getattr(user, "__code__", None), "co_filename", None)
        where = user_frame(e, path)
        return BadInputError(f"{where + ': ' if where else ''}batches() raised "
                             f"{type(e).__name__}: {first_line(e)}; fix batches() in model.py")
    try:
        it = iter(batches() if callable(batches) else batches)
    except SparsecError:
        raise
    except Exception as e:
        raise fail(e) from e
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except SparsecError:
            raise
        except Exception as e:
            raise fail(e) from e
        yield batch


def sharded_batches(batches: Callable[[], Iterable[Any]], rank: int, world_size: int,
                    start: int = 0) -> Iterator[Any]:
    """Items start + rank, start + rank + W, … of the cycled stream of `batches()`: the ranks
    together consume the stream in order, each item once, and a resumed run continues at
    `start` (the items consumed before it), whatever its world size."""
    return itertools.islice(cycle_batches(batches), start + rank, None, world_size)


def batch_rows(inputs: tuple) -> int:
    """Samples in a batch: the first tensor input's leading dimension (1 for a scalar)."""
    t = next((x for x in inputs if isinstance(x, torch.Tensor)), None)
    return 0 if t is None else (t.shape[0] if t.dim() else 1)


def batch_tokens(inputs: tuple) -> int:
    """Tokens in a batch: the first input's elements if it holds token ids, else its rows
    (all dimensions but the last)."""
    t = next((x for x in inputs if isinstance(x, torch.Tensor)), None)
    if t is None:
        return 0
    if not t.is_floating_point() or t.dim() < 2:
        return t.numel()
    return t.numel() // t.shape[-1]

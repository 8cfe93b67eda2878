"""Command-line options shared by several commands: plugins and model sources.

Kept apart from cli.py so each command gains them with one decorator line.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import click

__all__ = ["plugin_option", "source_options"]


def _load_plugins(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> None:
    from .errors import BadInputError
    from .passes.plugins import load_plugins

    try:
        load_plugins(value)
    except BadInputError as e:
        click.echo(f"error: {e}", err=True)
        ctx.exit(2)


plugin_option = click.option(
    "--plugin", "plugins", multiple=True, metavar="MODULE", expose_value=False, is_eager=True,
    callback=_load_plugins,
    help="Import MODULE (a module name or a .py path) so its @register-ed passes work in "
         "--pass and recipes (repeatable; also SPARSEC_PLUGINS=a,b).")


def source_options(*, data: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--task/--seq-len/--batch-size/--device (and with `data` --data/--eval-data/--eval-every/--seed),
    passed to the command as one `source` (a SourceOptions) and, for data, `eval_every`."""
    opts = [
        click.option("--task", type=click.Choice(["causal-lm", "masked-lm",
                                                  "sequence-classification", "embedding"]),
                     help="HF checkpoint directory: the head and built-in loss (default: from "
                          "config.json's architectures)."),
        click.option("--seq-len", type=click.IntRange(min=1),
                     help="Tokens per sequence (HF directory inputs, --data packing)."),
        click.option("--batch-size", type=click.IntRange(min=1),
                     help="Sequences per batch (HF directory inputs, --data batches)."),
        click.option("--device", metavar="DEVICE",
                     help="Put the model, its inputs and batches here (cpu, cuda, cuda:1); "
                          "default: where model() leaves it (an HF directory: cpu)."),
    ]
    if data:
        opts += [
            click.option("--data", type=click.Path(path_type=Path),
                         help="Training data: .txt, .jsonl (text, or prompt/completion), or a "
                              "tokenized .safetensors/.npy shard."),
            click.option("--eval-data", type=click.Path(path_type=Path),
                         help="Held-out data (same formats) for the eval loss."),
            click.option("--eval-every", type=click.IntRange(min=0), default=0,
                         show_default=True,
                         help="Eval loss every N steps (0: only after the last step)."),
            click.option("--seed", type=int, default=0, show_default=True,
                         help="Seed of the data shuffle."),
        ]

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kw: Any) -> Any:
            from .sources import SourceOptions

            names = ("task", "seq_len", "batch_size", "device", "data", "eval_data", "seed")
            kw["source"] = SourceOptions(**{n: kw.pop(n) for n in names if n in kw})
            return fn(*args, **kw)

        for opt in reversed(opts):
            wrapper = opt(wrapper)
        return wrapper
    return decorate

"""Where a model and its training data come from: a model.py, or an HF checkpoint directory,
with batches from `--data` files.

`open_model(model, SourceOptions(...))` traces the model and returns the Program with its
source's `loss` and `batches` set, plus the eval batches. A model.py's own hooks win unless a
data file is given; an HF directory gets the task's built-in loss.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from .errors import BadInputError
from .program import ModelSource, Program

__all__ = ["SourceOptions", "Opened", "open_model", "model_label"]


@dataclass(frozen=True)
class SourceOptions:
    """What the CLI's --task, --seq-len, --batch-size, --device, --data, --eval-data and --seed
    say."""

    task: str | None = None
    seq_len: int | None = None
    batch_size: int | None = None
    device: str | None = None
    data: Path | None = None
    eval_data: Path | None = None
    seed: int = 0

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, 0)}


@dataclass
class Opened:
    program: Program
    eval_batches: Callable[[], Any] | None = None
    tokenizer: Any = None
    task: str | None = None


def model_label(model: Any) -> str:
    return Path(model).name if isinstance(model, (str, Path)) else type(model).__name__


def open_model(model: str | Path, opts: SourceOptions | None = None) -> Opened:
    """Trace a model.py or an HF checkpoint directory, with batches from the data files."""
    from .hf_source import is_hf_dir

    opts = opts or SourceOptions()
    if is_hf_dir(model):
        return _open_hf(Path(model), opts)
    if Path(model).is_dir():
        raise BadInputError(f"{model}: is a directory without config.json; give a model.py or an "
                            "HF checkpoint directory (config.json + *.safetensors)")
    if opts.task is not None:
        raise BadInputError(f"--task is for HF checkpoint directories; {Path(model).name} "
                            "defines its own model() and loss()")
    return _open_file(Path(model), opts)


def parse_device(name: str | None) -> torch.device | None:
    """--device as a torch.device (None: not given); a device this machine lacks is refused."""
    if name is None:
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise BadInputError(f"--device {name}: not a device name; use cpu, cuda or cuda:N") \
            from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise BadInputError(f"--device {name}: this machine has {count} CUDA device(s); "
                                "drop --device or name one it has")
    elif device.type != "cpu":
        raise BadInputError(f"--device {name}: sparsec runs on cpu or cuda; use one of them")
    return device


def to_device(tree: Any, device: torch.device) -> Any:
    """`tree` (a batch: tensors in tuples, lists, dicts) with every tensor moved to `device`."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), tree)


def on_device(batches: Callable[[], Any] | None, device: torch.device | None
              ) -> Callable[[], Any] | None:
    """`batches` (a callable giving an iterable of batches) yielding them on `device`."""
    if batches is None or device is None:
        return batches

    @functools.wraps(batches)  # errors are located through __wrapped__ (the user's file)
    def moved():
        return (to_device(b, device) for b in batches())
    return moved


def _inputs_device(inputs: Any) -> torch.device | None:
    leaves = [t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    return leaves[0].device if leaves else None


def _data(opts: SourceOptions, task: str, tokenizer: Any, seq_len: int, batch: int):
    from .data import DataOptions, make_batches

    dopts = DataOptions(task=task, seq_len=seq_len, batch_size=batch, seed=opts.seed)
    train = make_batches(opts.data, dopts, tokenizer) if opts.data else None
    evals = make_batches(opts.eval_data, DataOptions(task=task, seq_len=seq_len,
                                                     batch_size=batch, shuffle=False),
                         tokenizer) if opts.eval_data else None
    return train, evals


def _open_hf(path: Path, opts: SourceOptions) -> Opened:
    from .frontend import trace
    from .hf_source import example_inputs_for, load_hf_dir, task_loss

    device = parse_device(opts.device) or torch.device("cpu")
    model, tokenizer, task = load_hf_dir(path, opts.task)
    model.to(device)
    seq_len, batch = opts.seq_len or 32, opts.batch_size or 2
    train, evals = (on_device(b, device) for b in _data(opts, task, tokenizer, seq_len, batch))
    if train is not None:
        first = next(iter(train()))
        inputs = first[:1] if task in ("causal-lm", "masked-lm") else first[:2]
    else:
        inputs = to_device(example_inputs_for(model, tokenizer, task, opts.seq_len,
                                              opts.batch_size), device)
    source = ModelSource(name=path.name, path=str(path), loss=task_loss(task), batches=train)
    program = trace(model, inputs, source=source)
    program.state.setdefault("report", {})["source"] = {"kind": "hf-directory", "task": task,
                                                        **_data_info(opts, inputs)}
    return Opened(program, evals, tokenizer, task)


def _open_file(path: Path, opts: SourceOptions) -> Opened:
    from .frontend import load_model_file, trace

    device = parse_device(opts.device)
    mf = load_model_file(path)
    model, inputs = mf.build()
    if device is not None:
        model.to(device)
        inputs = to_device(inputs, device)
    device = device or _inputs_device(inputs)
    source = ModelSource(name=mf.path.stem, path=str(mf.path), loss=mf.loss,
                         batches=on_device(mf.batches, device))
    if opts.data is None and opts.eval_data is None:
        if opts.seq_len or opts.batch_size:
            raise BadInputError("--seq-len and --batch-size shape the --data batches (or an HF "
                                "directory's inputs); a model.py sets its own in example_inputs()")
        return Opened(trace(model, inputs, source=source))
    tokenizer = _file_tokenizer(mf)
    shape = _token_shape(path, inputs)
    seq_len, batch = opts.seq_len or shape[1], opts.batch_size or shape[0]
    if (batch, seq_len) != shape:
        raise BadInputError(f"{path.name}: example_inputs() is {shape[0]} x {shape[1]} tokens "
                            f"but --batch-size/--seq-len ask for {batch} x {seq_len}; the graph "
                            "is traced at one shape, so make them equal")
    train, evals = (on_device(b, device)
                    for b in _data(opts, "causal-lm", tokenizer, seq_len, batch))
    if train is not None:
        source.batches = train
    program = trace(model, inputs, source=source)
    program.state.setdefault("report", {})["source"] = {"kind": "model.py",
                                                        **_data_info(opts, inputs)}
    return Opened(program, evals, tokenizer, None)


def _file_tokenizer(mf: Any) -> Any:
    """A model.py may define tokenizer() for text data (shards need none)."""
    hook = getattr(mf.module, "tokenizer", None)
    return hook() if callable(hook) else None


def _token_shape(path: Path, inputs: tuple) -> tuple[int, int]:
    first = inputs[0] if inputs else None
    if not (isinstance(first, torch.Tensor) and first.dim() == 2 and not first.is_floating_point()):
        raise BadInputError(f"{path.name}: --data makes batches of token ids, but the first "
                            "example input is not a (batch, seq) integer tensor")
    return int(first.shape[0]), int(first.shape[1])


def _data_info(opts: SourceOptions, inputs: tuple) -> dict[str, Any]:
    ids = inputs[0]
    info: dict[str, Any] = {"batch_size": int(ids.shape[0]), "seq_len": int(ids.shape[-1])}
    if opts.data:
        info["data"] = str(opts.data)
        info["seed"] = opts.seed
    if opts.eval_data:
        info["eval_data"] = str(opts.eval_data)
    return info

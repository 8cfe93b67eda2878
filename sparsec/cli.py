"""The `sparsec` command line: compile, train, passes, explain, layout, train-gates.

Exit codes: 0 ok, 2 bad input (model, recipe, options, files), 1 internal error. Errors print
one line; `-v` adds the traceback.
"""

from __future__ import annotations

import functools
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import click

from .cli_options import plugin_option, source_options
from .errors import BadInputError, SparsecError

__all__ = ["main", "cli"]


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn exceptions into one-line messages and exit codes (traceback only with -v)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, verbose: bool = False, **kwargs: Any) -> Any:
        try:
            return fn(*args, verbose=verbose, **kwargs)
        except SparsecError as e:
            if verbose:
                traceback.print_exc()
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except BrokenPipeError:  # `sparsec … | head`: the reader left; stop quietly
            _quiet_stdout()
            sys.exit(141)
        except SystemExit as e:  # only user code (model.py) exits inside a command
            if verbose:
                traceback.print_exc()
            _fail(f"model.py called sys.exit({e.code!r}) instead of returning; remove the "
                  "exit (or raise an exception with a message)", 2)
        except Exception as e:  # an internal error: say so and how to see more
            if verbose:
                traceback.print_exc()
            hint = "" if verbose else " (rerun with -v for the traceback)"
            _fail(f"internal error: {type(e).__name__}: {e}{hint}".splitlines()[0], 1)
    return wrapper


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush cannot fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (tests' runners)
        pass


def _finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    import math

    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


verbose_option = click.option("-v", "--verbose", is_flag=True, help="Show tracebacks and details.")


class _OneLineGroup(click.Group):
    """Usage errors (a bad option value, a missing argument) as one line, exit code 2."""

    def main(self, args: Any = None, prog_name: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # bare `sparsec`: the help
                click.echo(e.ctx.get_help() if e.ctx else e.format_message())
                sys.exit(0)
            where = e.ctx.command_path if e.ctx else "sparsec"
            _fail(f"{e.format_message()} (see `{where} --help`)", 2)
        except click.ClickException as e:
            _fail(e.format_message(), e.exit_code)
        except click.exceptions.Abort:
            _fail("interrupted", 130)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sparsec")
def cli() -> None:
    """sparsec: an ahead-of-time compiler for sparse training and sparse attention."""


@cli.command("compile")
@click.argument("model_file", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--recipe", "recipe", type=click.Path(path_type=Path), help="TOML recipe of passes.")
@click.option("--pass", "pass_args", multiple=True, metavar="NAME[:k=v,...]",
              help="A pass to run after the recipe's (repeatable).")
@click.option("--backend", type=click.Choice(["eager", "onnx", "triton"]), default="eager",
              show_default=True)
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path),
              help="Write report.json and artifacts to this directory.")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@click.option("--dump-dir", type=click.Path(path_type=Path),
              help="Write the graph after every pass as NNN_<pass>.py.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check every pass's numerics on the example inputs.")
@click.option("--opset", type=int, help="ONNX opset (onnx backend).")
@click.option("--onnx-attention", type=click.Choice(["auto", "gathered", "dense", "contrib"]),
              help="onnx: block-sparse attention as gathered blocks (auto, default), the dense "
                   "masked form, or com.microsoft.SparseAttention (contrib).")
@click.option("--onnx-provider", type=click.Choice(["cpu", "cuda"]),
              help="onnx: the execution provider the model is for (cuda allows the contrib op).")
@click.option("--onnx-dynamic", type=click.Choice(["auto", "batch", "none"]),
              help="onnx: dynamic batch and sequence (auto, default), batch only, or none.")
@click.option("--deltas", "deltas", type=click.Path(path_type=Path),
              help="Trained deltas (from `sparsec train`) to deploy; onnx merges them.")
@click.option("--partial-deltas", is_flag=True,
              help="Accept deltas that cover only some fine-tuned weights (others stay zero).")
@click.option("--plot-memory", type=click.Path(path_type=Path),
              help="Draw the training step's predicted memory per node (PNG/SVG/PDF/JPEG).")
@plugin_option
@source_options(data=False)
@verbose_option
@handle_errors
def compile_cmd(model_file: Path, recipe: Path | None, pass_args: tuple[str, ...], backend: str,
                out_dir: Path | None, force: bool, dump_dir: Path | None, verify: bool,
                opset: int | None, onnx_attention: str | None, onnx_provider: str | None,
                onnx_dynamic: str | None, deltas: Path | None, partial_deltas: bool,
                plot_memory: Path | None, source: Any, verbose: bool) -> None:
    """Trace MODEL (a model.py or an HF checkpoint directory), run the passes and lower it."""
    from .api import compile as compile_model
    from .memory_plot import check_plot_path, plot_memory_timeline
    from .report import render_summary

    if plot_memory is not None:
        check_plot_path(plot_memory)

    onnx_opts = {"opset": opset, "attention": onnx_attention, "provider": onnx_provider,
                 "dynamic": onnx_dynamic}
    onnx_opts = {k: v for k, v in onnx_opts.items() if v is not None}
    if onnx_opts and backend != "onnx":
        flag = next(iter(onnx_opts))
        flag = "--opset" if flag == "opset" else f"--onnx-{flag}"
        raise BadInputError(f"{flag} is an option of the onnx backend; add --backend onnx")
    with _status(f"compiling {model_file.name}", verbose):
        compiled = compile_model(model_file, recipe=recipe, passes=pass_args, backend=backend,
                                 out_dir=out_dir, verify=verify, dump_dir=dump_dir, force=force,
                                 backend_options=onnx_opts or None, deltas=deltas,
                                 partial_deltas=partial_deltas, source=source)
    render_summary(compiled.summary)
    if plot_memory is not None:
        click.echo(plot_memory_timeline(compiled.program, plot_memory))
    if out_dir is not None:
        click.echo(f"output: {out_dir}/")


@cli.command("train")
@click.argument("model_file", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--recipe", "recipe", type=click.Path(path_type=Path), help="TOML recipe of passes.")
@click.option("--pass", "pass_args", multiple=True, metavar="NAME[:k=v,...]",
              help="A pass to run after the recipe's (repeatable).")
@click.option("--steps", type=click.IntRange(min=1), required=True, help="Optimizer steps.")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path),
              help="Write deltas.safetensors, recipe.toml and report.json here.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3,
              show_default=True, callback=_finite,
              help="AdamW learning rate (with --resume: the checkpoint's).")
@click.option("--save-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also save deltas every K steps (0: only at the end).")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check every pass's numerics on the example inputs.")
@click.option("--resume", type=click.Path(path_type=Path),
              help="Continue from the checkpoint in this -o directory (any world size).")
@click.option("--fsdp", is_flag=True, help="Shard the frozen base weights with FSDP2 "
              "(distributed runs; see docs/distributed.md).")
@click.option("--backend", "dist_backend", type=click.Choice(["gloo", "nccl"]),
              help="torch.distributed backend (default: nccl with CUDA GPUs, else gloo).")
@plugin_option
@source_options(data=True)
@verbose_option
@handle_errors
def train_cmd(model_file: Path, recipe: Path | None, pass_args: tuple[str, ...], steps: int,
              out_dir: Path | None, lr: float, save_every: int, force: bool, verify: bool,
              resume: Path | None, fsdp: bool, dist_backend: str | None, source: Any,
              eval_every: int, verbose: bool) -> None:
    """Compile MODEL (a model.py or an HF checkpoint directory) with the recipe and train it
    on its batches() or on --data.

    Under torchrun (`torchrun --nproc-per-node N -m sparsec train ...`), with --resume or with
    --fsdp it trains data-parallel on torch.distributed (docs/distributed.md).
    """
    from .training.distributed.launch import end_worker, launched_by_torchrun

    if launched_by_torchrun() or resume is not None or fsdp or dist_backend is not None:
        from .training import train_distributed as train
        extra = {"resume": resume, "fsdp": fsdp, "backend": dist_backend}
        if resume is not None and _is_default("lr"):
            lr = None  # the checkpoint's
        if source.given() or Path(model_file).is_dir():
            raise BadInputError("--data, --task and HF checkpoint directories train in one "
                                "process for now; for a distributed run give a model.py "
                                "whose batches() reads the data")
    else:
        from .training import train_model as train
        extra = {"source": source, "eval_every": eval_every}
        if _is_default("lr"):
            lr = None  # AdamW's default, or the recipe's optimizer for a traced step
    with _TrainProgress(steps, f"compiling {model_file.name}") as progress:
        run = train(model_file, steps=steps, recipe=recipe, passes=pass_args, out_dir=out_dir,
                    lr=lr, save_every=save_every, force=force, verify=verify,
                    on_step=progress.update, **extra)
    if run.report:  # empty on a distributed run's other ranks: rank 0 reports
        _echo_train_report(run.report, out_dir)
    if launched_by_torchrun():
        end_worker()  # exit 0 now: see end_worker


def _echo_train_report(report: dict, out_dir: Path | None) -> None:
    t = report["train"]
    click.echo(f"trained {t['steps']} steps: loss {t['loss_first']:.4f} -> {t['loss_last']:.4f}, "
               f"{t['tokens_per_s']:,.0f} tokens/s, peak memory "
               f"{t['peak_memory_bytes'] / 2**20:,.0f} MiB")
    sf = report.get("sparse_finetune", {})
    if sf:
        click.echo(f"trainable: {sf['trainable_in_targets']:,} of {sf['targeted_weights']:,} "
                   f"targeted weights ({sf['density']:.2%})")
    d = report.get("distributed")
    if d:
        click.echo(f"distributed: {d['world_size']} ranks ({d['backend']}, {d['mode']}), "
                   f"{d['bytes_per_step']:,} bytes all-reduced per step "
                   f"(full fine-tuning: {d['full_ft_bytes_per_step']:,}), "
                   f"global step {d['global_step']}")
    ev = report.get("eval")
    if ev:
        click.echo(f"eval loss {ev['loss_first']:.4f} -> {ev['loss_last']:.4f} "
                   f"({len(ev['losses'])} evaluations of {ev['batches']} batches)")
    if out_dir is not None:
        saved = next((a for a in report.get("artifacts", [])
                      if a in ("deltas.safetensors", "trainable.safetensors")), "deltas.safetensors")
        click.echo(f"output: {out_dir}/ ({saved}, report.json)")


def _is_default(param: str) -> bool:
    from click.core import ParameterSource

    return click.get_current_context().get_parameter_source(param) == ParameterSource.DEFAULT


from .progress import TrainProgress as _TrainProgress  # noqa: E402


@cli.command("passes")
@plugin_option
@verbose_option
@handle_errors
def passes_cmd(verbose: bool) -> None:
    """List the registered passes (built-in and plugins)."""
    from rich.console import Console
    from rich.table import Table

    from .passes.base import PLUGIN_ERRORS, registered_passes, stage_of

    table = Table()
    for col in ("name", "stage", "requires", "establishes", "summary"):
        table.add_column(col)
    for name, cls in registered_passes().items():
        table.add_row(name, stage_of(cls), ", ".join(sorted(cls.requires)),
                      ", ".join(sorted(cls.establishes)) or "-", cls.summary)
    console = Console(width=max(120, Console().width))
    console.print(table)
    for name, err in PLUGIN_ERRORS.items():
        console.print(f"warning: {name}: {err}", style="yellow")


@cli.command("explain")
@click.argument("pass_name", metavar="PASS")
@plugin_option
@verbose_option
@handle_errors
def explain_cmd(pass_name: str, verbose: bool) -> None:
    """Show a pass's documentation and its options with defaults (PASS may carry options as
    --pass takes them, e.g. block-sparse-attention:layout=topk: they are checked and shown)."""
    import inspect

    from .passes.base import get_pass, option_specs, stage_of
    from .recipe import parse_pass_arg

    given = parse_pass_arg(pass_name) if ":" in pass_name else None
    cls = type(given) if given is not None else get_pass(pass_name)
    click.echo(f"{cls.name} — {cls.summary}")
    click.echo(f"stage: {stage_of(cls)}; requires: {', '.join(sorted(cls.requires)) or '-'}; "
               f"establishes: {', '.join(sorted(cls.establishes)) or '-'}")
    doc = inspect.getdoc(cls) or ""
    if doc:
        click.echo("\n" + doc)
    specs = option_specs(cls)
    click.echo("\noptions:" if specs else "\noptions: none")
    for s in specs:
        rng = ""
        if s["choices"]:
            rng = f" one of {', '.join(map(repr, s['choices']))}"
        elif s["min"] is not None or s["max"] is not None:
            rng = f" in [{s['min']}, {s['max']}]"
        value = getattr(given, s["name"]) if given is not None else s["default"]
        mark = f"  (default {s['default']!r})" if value != s["default"] else ""
        click.echo(f"  {s['name']} ({s['type']}) = {value!r}{rng}{mark}")
        if s["help"]:
            click.echo(f"      {s['help']}")


class _status:
    """A spinner on a terminal; nothing when output is piped."""

    def __init__(self, text: str, verbose: bool):
        self.text, self.verbose, self.ctx = text, verbose, None

    def __enter__(self) -> None:
        from rich.console import Console

        console = Console(stderr=True)
        if console.is_terminal:
            self.ctx = console.status(self.text)
            self.ctx.__enter__()
        elif self.verbose:
            click.echo(f"{self.text} …", err=True)

    def __exit__(self, *exc: Any) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


@cli.command("layout")
@click.argument("model_file", metavar="[MODEL.py]", required=False, type=click.Path(path_type=Path))
@click.option("--layout", "layout", default="sliding-window", show_default=True,
              help="Layout name (see `sparsec explain block-sparse-attention`).")
@click.option("--seq-len", type=int, help="Query length (static layouts without MODEL.py).")
@click.option("--kv-len", type=int, help="Key length (default: --seq-len).")
@click.option("--block", type=int, default=64, show_default=True)
@click.option("--window", type=int, default=256, show_default=True)
@click.option("--sink", type=int, default=64, show_default=True)
@click.option("--stride", type=int, default=256, show_default=True)
@click.option("--dilation", type=int, default=2, show_default=True)
@click.option("--global-tokens", type=int, default=64, show_default=True)
@click.option("--random-blocks", type=int, default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--topk", type=int, default=8, show_default=True)
@click.option("--threshold", type=float, default=0.9, show_default=True)
@click.option("--vertical", type=int, default=64, show_default=True)
@click.option("--slash", type=int, default=64, show_default=True)
@click.option("--mixture", default="", help="Comma-separated static layouts for heads.")
@click.option("--heads", type=int, default=1, show_default=True,
              help="Heads to build (bigbird, mixture) when no MODEL.py is given.")
@click.option("--causal/--no-causal", default=True, show_default=True)
@click.option("--site", type=int, default=0, show_default=True,
              help="With MODEL.py: which rewritten attention site to plot.")
@click.option("--head", "plot_heads", default="0", show_default=True,
              help="Comma-separated heads to plot.")
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), required=True,
              help="PNG file to write.")
@verbose_option
@handle_errors
def layout_cmd(model_file: Path | None, out: Path, verbose: bool, **kw: Any) -> None:
    """Draw a block layout as a heatmap PNG (static, or as chosen on MODEL.py's inputs)."""
    from .cli_layout import draw_layout

    click.echo(draw_layout(model_file, out, **kw))


@cli.command("train-gates")
@click.argument("model_file", metavar="MODEL.py", type=click.Path(path_type=Path))
@click.option("--recipe", "recipe", type=click.Path(path_type=Path),
              help="Recipe with block-sparse-attention, layout = \"learned\".")
@click.option("--pass", "pass_args", multiple=True, metavar="NAME[:k=v,...]",
              help="A pass to run after the recipe's (repeatable).")
@click.option("--steps", type=int, default=100, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=5e-3,
              show_default=True, callback=_finite)
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), required=True,
              help="safetensors file for the trained gates (use it as the pass's `gates`).")
@verbose_option
@handle_errors
def train_gates_cmd(model_file: Path, recipe: Path | None, pass_args: tuple[str, ...],
                    steps: int, lr: float, out: Path, verbose: bool) -> None:
    """Train learned attention gates by distillation (base weights frozen)."""
    from .cli_layout import train_gates_file

    def log(step: int, loss: float) -> None:
        if verbose or step % 10 == 0:
            click.echo(f"step {step}: loss {loss:.5f}", err=True)

    click.echo(train_gates_file(model_file, recipe, pass_args, steps, lr, out, log))


@cli.command("export")
@click.argument("model", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--deltas", type=click.Path(path_type=Path), required=True,
              help="deltas.safetensors (or trainable.safetensors) from `sparsec train`.")
@click.option("--format", "fmt", type=click.Choice(["hf", "peft-shira"]), default="hf",
              show_default=True, help="hf: a merged save_pretrained directory; peft-shira: a "
                                      "PEFT SHiRA adapter for the unchanged base.")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Directory to write.")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@source_options(data=False)
@verbose_option
@handle_errors
def export_cmd(model: Path, deltas: Path, fmt: str, out_dir: Path, force: bool, source: Any,
               verbose: bool) -> None:
    """Write MODEL (an HF directory, or a model.py around a transformers model) with trained
    deltas as an HF directory or a PEFT adapter."""
    from .export import describe, export_model

    with _status(f"exporting {model.name}", verbose):
        record = export_model(model, deltas, out_dir, fmt=fmt, source=source, force=force)
    click.echo(describe(record, out_dir))


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="sparsec")


if __name__ == "__main__":  # pragma: no cover
    main()

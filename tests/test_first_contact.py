"""Small things a new user meets first (issue 19, item 7)."""

import pytest
import torch

import sparsec
from sparsec.errors import BadInputError, OptionError


@pytest.mark.slow
def test_onnx_outputs_are_named_after_the_model_outputs():
    import onnx

    from sparsec.testing.hf import hf_model

    model, inputs = hf_model("bert", layers=1)
    compiled = sparsec.compile(sparsec.trace(model, inputs), backend="onnx")
    names = [o.name for o in onnx.load(compiled.artifacts["model.onnx"]).graph.output]
    assert names == ["last_hidden_state"]


@pytest.mark.slow
def test_onnx_output_of_an_hf_directory_is_logits(tmp_path):
    import onnx

    from sparsec.sources import SourceOptions
    from sparsec.testing.hf_dirs import make_dir

    path = make_dir(tmp_path / "m")
    compiled = sparsec.compile(path, backend="onnx", source=SourceOptions(seq_len=8))
    assert [o.name for o in onnx.load(compiled.artifacts["model.onnx"]).graph.output] == \
        ["logits"]


def test_summary_mentions_deltas_and_memory_in_gib(tiny_llama_program):
    from rich.console import Console

    from sparsec.report import render_summary

    compiled = sparsec.compile(tiny_llama_program.copy(),
                               passes=["sparse-finetune:density=0.05", "joint-graph"])
    console = Console(record=True, width=200)
    render_summary(compiled.summary, console)
    text = console.export_text()
    assert "--deltas" in text
    assert "memory plan: predicted peak" in text and "GiB" in text


def test_layout_jpg_is_a_jpeg_and_unknown_suffix_refused(tmp_path):
    from sparsec.cli_layout import draw_layout

    kw = dict(layout="sliding-window", seq_len=256, block=64, window=64, sink=0)
    line = draw_layout(None, tmp_path / "x.jpg", **kw)
    assert (tmp_path / "x.jpg").read_bytes()[:3] == b"\xff\xd8\xff" and "warning" not in line
    with pytest.raises(BadInputError, match="cannot write a .bmp image"):
        draw_layout(None, tmp_path / "x.bmp", **kw)
    assert not (tmp_path / "x.bmp").exists()


def test_layout_keeping_everything_warns(tmp_path):
    from sparsec.cli_layout import draw_layout

    line = draw_layout(None, tmp_path / "x.png", layout="sliding-window", seq_len=128,
                       block=64, window=256, sink=64)
    assert "warning: this layout keeps 100%" in line


def test_layout_name_did_you_mean():
    with pytest.raises(OptionError, match="did you mean 'sliding-window'"):
        sparsec.parse_pass_arg("block-sparse-attention:layout=sliding-windw")


def test_memory_plot_marks_the_peak(tmp_path, tiny_llama_program):
    from sparsec.memory import predict_peak, predict_timeline
    from sparsec.memory_plot import plot_memory_timeline

    compiled = sparsec.compile(tiny_llama_program.copy(),
                               passes=["sparse-finetune:density=0.05", "joint-graph"])
    gm = compiled.program.gm
    timeline = predict_timeline(gm)
    plan = predict_peak(gm)
    assert max(v for _, v in timeline) == plan.peak_transient_bytes
    line = plot_memory_timeline(compiled.program, tmp_path / "mem.png")
    assert (tmp_path / "mem.png").read_bytes()[:4] == b"\x89PNG"
    assert plan.peak_node in line


@pytest.mark.slow
def test_cli_plot_memory(tmp_path, run_cli, tiny_llama_path):
    r = run_cli("compile", tiny_llama_path, "--pass", "sparse-finetune:density=0.05",
                "--pass", "joint-graph", "--plot-memory", tmp_path / "mem.png")
    assert r.returncode == 0, r.stderr
    assert "memory plot:" in r.stdout and (tmp_path / "mem.png").exists()
    r = run_cli("compile", tiny_llama_path, "--plot-memory", tmp_path / "mem.gif")
    assert r.returncode == 2 and "cannot write a .gif image" in r.stderr

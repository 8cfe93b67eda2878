"""Layout heatmaps and the `sparsec layout` / `sparsec train-gates` commands."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from sparsec.cli import cli
from sparsec.errors import BadInputError
from sparsec.layouts import sliding_window
from sparsec.layouts.plot import plot_layout

PNG = b"\x89PNG\r\n\x1a\n"


def test_plot_layout_writes_png(tmp_path):
    out = plot_layout(sliding_window(256, block=16, window=48, sink=16), tmp_path / "l.png")
    assert out.read_bytes().startswith(PNG)
    with pytest.raises(BadInputError, match="cannot plot head 3"):
        plot_layout(sliding_window(64, block=16), tmp_path / "x.png", heads=(3,))


def test_layout_command_static(tmp_path):
    out = tmp_path / "layout.png"
    r = CliRunner().invoke(cli, ["layout", "--layout", "sliding-window", "--seq-len", "4096",
                                 "--block", "64", "--window", "256", "--sink", "64", "-o",
                                 str(out)])
    assert r.exit_code == 0, r.output
    assert "density 17.7% of the causal grid" in r.output
    assert out.read_bytes().startswith(PNG)


@pytest.mark.parametrize("args,message", [
    (["--layout", "topk", "--seq-len", "128"], "give a MODEL.py"),
    (["--layout", "sliding-window", "--seq-len", "128", "--block", "48"], "choose one of"),
    (["--layout", "sliding-window", "--seq-len", "32"], "--block 64 is larger"),
])
def test_layout_command_errors_are_one_line(tmp_path, args, message):
    r = CliRunner().invoke(cli, ["layout", *args, "-o", str(tmp_path / "x.png")])
    assert r.exit_code == 2
    assert message in r.output and r.output.count("\n") == 1, r.output


def test_layout_command_on_a_model_and_train_gates(tmp_path, tiny_llama_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["layout", str(tiny_llama_path), "--layout", "topk", "--block", "16",
                            "--topk", "1", "--window", "0", "--sink", "0", "--head", "0,1",
                            "-o", str(tmp_path / "topk.png")])
    assert r.exit_code == 0, r.output
    assert "topk, L=32, S=32, block 16" in r.output
    recipe = tmp_path / "learned.toml"
    recipe.write_text('[[pass]]\nname = "block-sparse-attention"\nlayout = "learned"\n'
                      'block = 16\ntopk = 1\nwindow = 0\nsink = 0\n')
    gates = tmp_path / "gates.safetensors"
    r = runner.invoke(cli, ["train-gates", str(tiny_llama_path), "--recipe", str(recipe),
                            "--steps", "3", "-o", str(gates)])
    assert r.exit_code == 0, r.output
    assert "4 gate tensors" in r.output and gates.exists()
    with recipe.open("a") as f:
        f.write(f'gates = "{gates}"\n')
    r = runner.invoke(cli, ["compile", str(tiny_llama_path), "--recipe", str(recipe), "-o",
                            str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    att = json.loads((tmp_path / "out" / "report.json").read_text())["attention"]
    assert att["sites_rewritten"] == 2 and att["layout"] == "learned"

"""The bad-input catalog: every case exits 2 with one line, no traceback, and no output.

Cases run through the CLI in-process (click's runner) and through the Python API.
"""

from pathlib import Path

import pytest
from click.testing import CliRunner

import sparsec
from sparsec.cli import cli

HERE = Path(__file__).parent
TINY = HERE.parents[1] / "examples" / "tiny_llama.py"

# (case id, model file, extra CLI args, words the one-line error must contain)
CASES = [
    ("missing model.py", HERE / "nope.py", [], "no such file"),
    ("model.py is a directory", HERE, [], "is a directory"),
    ("syntax error", HERE / "syntax_error.py", [], "syntax error"),
    ("raises on import", HERE / "raises_on_import.py", [], "raised ValueError"),
    ("no model()", HERE / "no_model.py", [], "defines no model()"),
    ("model() not a module", HERE / "not_a_module.py", [], "not a torch.nn.Module"),
    ("example inputs of the wrong type", HERE / "wrong_inputs.py", [], "return a tuple"),
    ("untraceable model", HERE / "data_dependent.py", [], "data-dependent control flow"),
    ("model raises on its inputs", HERE / "shape_error.py", [], "raised RuntimeError"),
    ("NaN in inputs under --verify", HERE / "nan_inputs.py", [], "contains NaN or Inf"),
    ("recipe syntax error", TINY, ["--recipe", HERE / "bad_syntax.toml"], "TOML syntax error"),
    ("unknown pass", TINY, ["--recipe", HERE / "unknown_pass.toml"], "unknown pass 'dead-cod'"),
    ("unknown option", TINY, ["--recipe", HERE / "unknown_key.toml"], "no option 'aggressive'"),
    ("wrong option type", TINY, ["--recipe", HERE / "wrong_type.toml"], "must be"),
    ("out-of-range option", TINY, ["--recipe", HERE / "out_of_range.toml"], "out of range"),
    ("requires not met", TINY, ["--recipe", HERE / "needs_joint.toml"],
     "run 'joint-graph' before it"),
    ("missing recipe", TINY, ["--recipe", HERE / "none.toml"], "no such recipe"),
    ("bad --pass", TINY, ["--pass", "freeze:trainable"], "is not key=value"),
]


@pytest.mark.parametrize("case, model, args, words", CASES, ids=[c[0] for c in CASES])
def test_cli_bad_input(case, model, args, words, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["compile", str(model), "-o", str(out), *map(str, args)])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert words in lines[0]
    assert "Traceback" not in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case, model, args, words", CASES, ids=[c[0] for c in CASES])
def test_api_bad_input(case, model, args, words, tmp_path):
    recipe = args[1] if args and args[0] == "--recipe" else None
    passes = [args[1]] if args and args[0] == "--pass" else []
    with pytest.raises(sparsec.BadInputError, match=None) as e:
        sparsec.compile(model, recipe=recipe, passes=passes, out_dir=tmp_path / "out")
    assert words in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_then_replaced_with_force(tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["compile", str(TINY), "-o", str(out)])
    assert r.exit_code == 0, r.output
    (out / "keep").write_text("old")
    r = CliRunner().invoke(cli, ["compile", str(TINY), "-o", str(out)])
    assert r.exit_code == 2 and "pass --force" in r.stderr
    assert (out / "keep").read_text() == "old"
    r = CliRunner().invoke(cli, ["compile", str(TINY), "-o", str(out), "--force"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == [".sparsec-output", "recipe.toml",
                                                     "report.json"]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   PermissionError(13, "Permission denied")])
def test_write_failures_leave_nothing_behind(monkeypatch, tmp_path, error):
    import sparsec.outputs

    def fail(path, text):
        Path(path).write_text(text[: len(text) // 2])  # half a file, then the failure
        raise error

    monkeypatch.setattr(sparsec.outputs, "atomic_write_text", fail)
    r = CliRunner().invoke(cli, ["compile", str(TINY), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and error.strerror in r.stderr, r.output
    assert list(tmp_path.iterdir()) == []


def test_unreadable_model_file(monkeypatch, tmp_path):
    model = tmp_path / "model.py"
    model.write_text("import torch\n")

    def deny(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(sparsec.BadInputError, match="cannot read it \\(Permission denied\\)"):
        sparsec.trace_file(model)


# deltas files ----------------------------------------------------------------------------------
RECIPE = HERE.parents[1] / "examples" / "finetune_delta.toml"


@pytest.fixture(scope="module")
def deltas_file(tmp_path_factory):
    """A valid deltas file for tiny_llama with the example recipe (values made non-zero)."""
    program = sparsec.run_passes(sparsec.trace_file(TINY), sparsec.load_recipe(RECIPE))
    deltas = sparsec.extract_deltas(program)
    for td in deltas.targets.values():
        td.tensors["values"] += 0.01
    return sparsec.save_deltas(deltas, tmp_path_factory.mktemp("deltas") / "deltas.safetensors")


def _edited(deltas_file, tmp_path, edit):
    d = sparsec.load_deltas(deltas_file)
    edit(next(iter(d.targets.values())))
    return sparsec.save_deltas(d, tmp_path / "edited.safetensors")


def _bad_deltas(kind, deltas_file, tmp_path):
    data = deltas_file.read_bytes()
    if kind == "corrupt":
        path = tmp_path / "corrupt.safetensors"
        path.write_bytes(b"\x07" * 64 + data[64:])
    elif kind == "truncated":
        path = tmp_path / "truncated.safetensors"
        path.write_bytes(data[: len(data) // 2])
    elif kind == "out of range":
        def edit(td):
            td.tensors["indices"][-1] = td.shape[0] * td.shape[1] + 5
        path = _edited(deltas_file, tmp_path, edit)
    elif kind == "other base":
        d = sparsec.load_deltas(deltas_file)
        d.base_fingerprint = "0123456789abcdef"
        path = sparsec.save_deltas(d, tmp_path / "other.safetensors")
    else:
        path = tmp_path / "missing.safetensors"
    return path


@pytest.mark.parametrize("kind, words", [
    ("corrupt", "not a readable safetensors deltas file"),
    ("truncated", "not a readable safetensors deltas file"),
    ("out of range", "indices out of range"),
    ("other base", "trained on base model 0123456789abcdef"),
    ("missing", "no such deltas file"),
])
def test_bad_deltas_files(kind, words, deltas_file, tmp_path):
    path = _bad_deltas(kind, deltas_file, tmp_path)
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["compile", str(TINY), "--recipe", str(RECIPE), "--deltas",
                                 str(path), "-o", str(out)])
    assert r.exit_code == 2, (r.output, r.exception)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and words in lines[0], r.stderr
    assert not out.exists()


def test_good_deltas_file_deploys(deltas_file, tmp_path):
    r = CliRunner().invoke(cli, ["compile", str(TINY), "--recipe", str(RECIPE), "--deltas",
                                 str(deltas_file), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output


# attention options -----------------------------------------------------------------------------
@pytest.mark.parametrize("arg, words", [
    ("block-sparse-attention:block=64", "has length 32; choose block"),
    ("block-sparse-attention:block=48", "choose one of 0, 16, 32, 64, 128"),
])
def test_bad_attention_options(arg, words, tmp_path):
    r = CliRunner().invoke(cli, ["compile", str(TINY), "--pass", arg, "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and words in r.stderr, r.output
    assert len([x for x in r.stderr.splitlines() if x.strip()]) == 1
    assert list(tmp_path.iterdir()) == []

"""Hostile inputs (issue 18): each exits 2 with one line, no traceback, nothing written/lost."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from sparsec.cli import cli

HERE = Path(__file__).parent
TINY = HERE.parents[1] / "examples" / "tiny_llama.py"

BAD_PASS_ARGS = [
    ("sparse-finetune:density=nan", "finite"), ("sparse-finetune:density=inf", "finite"),
    ("sparse-finetune:density=-inf", "finite"), ("sparse-finetune:regrow_fraction=nan", "finite"),
    ("sparse-finetune:regrow_fraction=inf", "finite"),
    ("sparse-finetune:seed=99999999999999999999", "64-bit"),
    ("sparse-finetune:seed=-99999999999999999999", "64-bit"),
    ("sparse-finetune:density=2.0", "out of range"), ("sparse-finetune:density=-1", "out of range"),
    ("sparse-finetune:method=dense", "choose one of"), ("sparse-finetune:density='x'", "must be"),
    ("sparse-finetune:nope=1", "no option"), ("sparse-finetune:densty=0.1", "did you mean"),
    ("dead-cod", "unknown pass"), (":x=1", "give a pass name"), ("freeze:trainable", "key=value"),
    ("sparse-finetune:seed=" + "[" * 3000 + "]" * 3000, ""),
]

BAD_RECIPES = [
    ("pass = [1, 2]", "not a table"), ('pass = ["a"]', "not a table"), ("pass = 3", "[[pass]]"),
    ("pass = [[1]]", "not a table"), ("x = " + "[" * 100000 + "]" * 100000, "nested too deeply"),
    ("version = 2", "not supported"), ("version = true", "not supported"),
    ('version = "1"', "not supported"), ("version = 1.0", "not supported"),
    ("description = 3", "must be a string"), ("bogus = 1", "unknown top-level key"),
    ("[[pass]]\nmethod = 1", "has no `name`"), ("[[pass]]\nname = 3", "must be a string"),
    ('[[pass]]\nname = "nope"', "unknown pass"), ("[[pass", "TOML syntax error"),
    ('[[pass]]\nname = "sparse-finetune"\nseed = 99999999999999999999', ""),
    ('[[pass]]\nname = "sparse-finetune"\ndensity = nan', "finite"),
    ('[[pass]]\nname = "sparse-finetune"\ndensity = inf', "finite"),
    ('[[pass]]\nname = "sparse-finetune"\nregrow_fraction = -inf', "finite"),
    ('[[pass]]\nname = "sparse-finetune"\nseed = 9223372036854775808', ""),
    ('[[pass]]\nname = "sparse-finetune"\nfoo = 1', "no option 'foo'"),
    ('[[pass]]\nname = "sparse-finetune"\nmethod = 1', "must be"),
    ('[[pass]]\nname = "joint-graph"\n[[pass]]\nname = "sparse-finetune"', "removed it"),
    ("\xff\xfe", ""),
]

BAD_CLI = [
    (["train", str(TINY), "--steps", "1", "--lr", "nan"], "not a finite number"),
    (["train", str(TINY), "--steps", "1", "--lr", "inf"], ""),
    (["train", str(TINY), "--steps", "1", "--lr", "-1"], ""),
    (["train", str(TINY), "--steps", "1", "--lr", "0"], ""),
    (["train", str(TINY), "--steps", "0"], ""), (["train", str(TINY)], "Missing option"),
    (["train", str(TINY), "--steps", "x"], ""), (["compile"], "Missing argument"),
    (["compile", str(TINY), "--backend", "tpu"], ""), (["explain"], "Missing argument"),
    (["explain", "nope"], "unknown pass"), (["nope"], "No such command"),
    (["compile", str(TINY), "--opset", "17"], "add --backend onnx"),
    (["compile", str(TINY), "--onnx-attention", "dense"], "add --backend onnx"),
    (["compile", str(TINY), "--bogus"], "No such option"),
    (["train-gates", str(TINY), "-o", "g.safetensors", "--lr", "nan"], "finite"),
    (["compile", str(TINY), "--recipe", "/dev/zero"], "not a regular file"),
    (["compile", str(TINY), "--recipe", "/dev/null"], "not a regular file"),
    (["compile", str(TINY), "--recipe", "/"], "directory"),
    (["compile", str(TINY), "--recipe", "/nonexistent.toml"], "no such recipe"),
    (["compile", str(TINY), "--deltas", "/dev/zero"], "not a regular file"),
    (["compile", str(TINY), "--deltas", "/nonexistent.safetensors"], "no such deltas"),
    (["compile", "/dev/zero"], "not a regular file"), (["compile", str(HERE)], "is a directory"),
    (["compile", str(TINY), "-o", "."], "current directory"),
    (["compile", str(TINY), "-o", ".."], "current directory"),
    (["compile", str(TINY), "-o", "/"], "current directory"),
    (["train", str(TINY), "--steps", "1", "-o", "."], "current directory"),
    (["train", str(TINY), "--steps", "1", "--resume", "/nonexistent"], "no such checkpoint"),
]


def _check(result, words, root: Path, before: dict):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert words in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert _snapshot(root) == before  # nothing written, nothing lost


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("arg, words", BAD_PASS_ARGS, ids=[a[:40] for a, _ in BAD_PASS_ARGS])
def test_bad_pass_arg(arg, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    r = CliRunner().invoke(cli, ["compile", str(TINY), "--pass", arg, "-o", "out"])
    _check(r, words, tmp_path, before)


@pytest.mark.parametrize("text, words", BAD_RECIPES, ids=[t[:40] for t, _ in BAD_RECIPES])
def test_bad_recipe(text, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.toml").write_bytes(text.encode("latin-1") if "\xff" in text else text.encode())
    before = _snapshot(tmp_path)
    r = CliRunner().invoke(cli, ["compile", str(TINY), "--recipe", "r.toml", "-o", "out"])
    _check(r, words, tmp_path, before)


@pytest.mark.parametrize("args, words", BAD_CLI, ids=[" ".join(a)[-40:] for a, _ in BAD_CLI])
def test_bad_cli(args, words, tmp_path, monkeypatch):
    sub = tmp_path / "cwd"
    sub.mkdir()
    (sub / "mine.txt").write_text("user data")
    monkeypatch.chdir(sub)
    before = _snapshot(tmp_path)
    r = CliRunner().invoke(cli, args)
    _check(r, words, tmp_path, before)


def _user_dir(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "model.py").write_text(TINY.read_text())
    (proj / "notes.txt").write_text("mine")
    return proj


@pytest.mark.parametrize("extra", [[], ["--force"]])
@pytest.mark.parametrize("where", ["proj", "file", "model_dir", "dump_eq", "dump_file"])
def test_force_never_deletes_user_files(where, extra, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proj = _user_dir(tmp_path)
    (tmp_path / "afile").write_text("x")
    args = {"proj": ["compile", str(TINY), "-o", "proj"],
            "file": ["compile", str(TINY), "-o", "afile"],
            "model_dir": ["compile", str(proj / "model.py"), "-o", "proj"],
            "dump_eq": ["compile", str(TINY), "-o", "o2", "--dump-dir", "o2"],
            "dump_file": ["compile", str(TINY), "-o", "o3", "--dump-dir", "afile"]}[where]
    before = _snapshot(tmp_path)
    r = CliRunner().invoke(cli, args + extra)
    _check(r, "", tmp_path, before)
    if where == "file":
        assert "--force" not in r.stderr.split(";")[0] and "not a directory" in r.stderr


# deltas checked against the program, not their own header ------------------------------------
RECIPE = HERE.parents[1] / "examples" / "finetune_delta.toml"


@pytest.fixture(scope="module")
def good_deltas(tmp_path_factory):
    import sparsec

    program = sparsec.run_passes(sparsec.trace_file(TINY), sparsec.load_recipe(RECIPE))
    return sparsec.extract_deltas(program), tmp_path_factory.mktemp("d")


def _first(d):
    return next(iter(d.targets.values()))


def _shrink(d):  # header and tensors agree with each other, not with the model
    td = _first(d)
    td.shape = (1, td.shape[1])
    td.tensors["indices"] = td.tensors["indices"][:1] % td.shape[1]
    td.tensors["values"] = td.tensors["values"][:1]


def _drop(d):
    d.targets.pop(next(iter(d.targets)))


def _nan(d):
    _first(d).tensors["values"][0] = float("nan")


def _dtype(d):
    _first(d).tensors["values"] = _first(d).tensors["values"].double()


def _dupe(d):
    t = _first(d).tensors["indices"]
    t[1] = t[0]


@pytest.mark.parametrize("edit, words", [(_shrink, "the model's is"), (_drop, "the deltas lack"),
                                         (_nan, "NaN or Inf"), (_dtype, "the model's is"),
                                         (_dupe, "sorted and unique")],
                         ids=["header shape", "missing target", "nan", "dtype", "duplicate"])
def test_deltas_must_fit_the_program(edit, words, good_deltas, tmp_path, monkeypatch):
    import copy

    import sparsec

    d = copy.deepcopy(good_deltas[0])
    edit(d)
    path = sparsec.save_deltas(d, tmp_path / "d.safetensors")
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    r = CliRunner().invoke(cli, ["compile", str(TINY), "--recipe", str(RECIPE), "--deltas",
                                 str(path), "-o", "out"])
    _check(r, words, tmp_path, before)


def test_nan_is_a_mismatch_unless_at_the_same_place():
    import torch

    from sparsec.pipeline import compare_outputs

    nan, inf = float("nan"), float("inf")
    assert compare_outputs(torch.tensor([1.0, nan]), torch.tensor([5.0, nan]))["max_rel_err"] > 0.5
    assert compare_outputs(torch.tensor([1.0, nan]), torch.tensor([1.0, 2.0]))["max_rel_err"] == inf
    assert compare_outputs(torch.tensor([1.0, 2.0]), torch.tensor([1.0, nan]))["max_abs_err"] == inf
    assert compare_outputs(torch.tensor([inf]), torch.tensor([-inf]))["max_rel_err"] == inf
    assert compare_outputs(torch.tensor([1.0, inf]), torch.tensor([1.0, inf]))["max_rel_err"] == 0

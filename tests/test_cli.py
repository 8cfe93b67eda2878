import json
from pathlib import Path

BAD = Path(__file__).parent / "bad_inputs"


def test_compile_onnx_writes_model_and_report(run_cli, tiny_llama_path, tmp_path):
    out = tmp_path / "out"
    r = run_cli("compile", tiny_llama_path, "--backend", "onnx", "-o", out,
                "--pass", "dead-code", "--dump-dir", tmp_path / "dump")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == [".sparsec-output", "model.onnx", "recipe.toml",
                                                     "report.json"]
    report = json.loads((out / "report.json").read_text())
    assert report["backend"] == "onnx"
    assert report["onnx"]["max_abs_err"] < 1e-4
    assert [p["name"] for p in report["passes"]] == ["dead-code"]
    assert set(report["passes"][0]) >= {"name", "modified", "stats", "ms"}
    assert report["params"]["total"] == report["params"]["trainable"] > 0
    assert set(report["verify"]) >= {"max_abs_err", "max_rel_err", "reference"}
    assert report["artifacts"] == ["model.onnx", "recipe.toml", "report.json"]
    assert "dead-code" in r.stdout and "parity" in r.stdout
    assert (tmp_path / "dump" / "001_dead-code.py").exists()
    # the output directory is refused the second time, and replaced with --force
    again = run_cli("compile", tiny_llama_path, "-o", out)
    assert again.returncode == 2 and "pass --force" in again.stderr
    forced = run_cli("compile", tiny_llama_path, "-o", out, "--force")
    assert forced.returncode == 0, forced.stderr
    assert sorted(p.name for p in out.iterdir()) == [".sparsec-output", "recipe.toml",
                                                     "report.json"]


def _one_line_error(r, code=2):
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_unknown_recipe_key_exits_2_with_one_line(run_cli, tiny_llama_path, tmp_path):
    r = run_cli("compile", tiny_llama_path, "--recipe", BAD / "unknown_key.toml", "-o",
                tmp_path / "o")
    line = _one_line_error(r)
    assert "unknown_key.toml:5" in line and "no option 'aggressive'" in line
    assert not (tmp_path / "o").exists()


def test_model_raising_on_import_exits_2_without_traceback(run_cli, tmp_path):
    r = run_cli("compile", BAD / "raises_on_import.py", "-o", tmp_path / "o")
    line = _one_line_error(r)
    assert "ValueError" in line
    assert not any(tmp_path.iterdir())


def test_verbose_shows_the_traceback(run_cli):
    r = run_cli("compile", BAD / "data_dependent.py", "-v")
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_passes_and_explain(run_cli):
    r = run_cli("passes")
    assert r.returncode == 0 and "dead-code" in r.stdout and "freeze" in r.stdout
    e = run_cli("explain", "freeze")
    assert e.returncode == 0 and "trainable" in e.stdout and "options:" in e.stdout
    bad = run_cli("explain", "freez")
    assert "did you mean 'freeze'" in _one_line_error(bad)


def test_explain_checks_and_shows_given_options(run_cli):
    e = run_cli("explain", "block-sparse-attention:layout=topk,topk=3")
    assert e.returncode == 0, e.stderr
    assert "topk (int) = 3" in e.stdout and "(default 8)" in e.stdout
    assert "layout (str) = 'topk'" in e.stdout
    bad = run_cli("explain", "block-sparse-attention:layout=nope")
    assert bad.returncode == 2 and "'nope'" in _one_line_error(bad)


def test_triton_backend_falls_back_to_references_on_the_cpu(run_cli, tiny_llama_path, tmp_path):
    out = tmp_path / "out"
    r = run_cli("compile", tiny_llama_path, "--backend", "triton", "-o", out, "--pass",
                "block-sparse-attention:layout=sliding-window,window=32,sink=16,block=16")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["backend"] == "triton"
    assert report["triton"]["device"] == "cpu" and report["triton"]["kernels"] == []
    assert "CUDA" in report["triton"]["fallback"]
    assert report["triton"]["ops"] == ["block_sparse_attention"]
    assert any("reference" in n for n in report["notes"]) and "note:" in r.stdout

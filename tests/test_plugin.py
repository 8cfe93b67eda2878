"""A third-party pass, installed as a package, works from a recipe like a built-in one."""

import json
import subprocess
import sys
import textwrap

PLUGIN = '''
from dataclasses import dataclass

import torch

from sparsec import Pass, PassResult, option


@dataclass(frozen=True)
class CountLinears(Pass):
    """Counts aten.linear nodes; changes nothing."""

    name = "count-linears"
    summary = "count linear layers"
    minimum: int = option(0, "fail below this many", min=0)

    def run(self, program):
        n = len(program.call_nodes(torch.ops.aten.linear.default))
        if n < self.minimum:
            raise ValueError(f"only {n} linears")
        return PassResult(modified=False, stats={"linears": n})
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "sparsec-count-linears"
version = "0.0.1"

[project.entry-points."sparsec.passes"]
count-linears = "sparsec_count_linears:CountLinears"
'''


def test_plugin_pass_from_entry_point(tmp_path, run_cli, tiny_llama_path):
    src = tmp_path / "plugin"
    (src / "sparsec_count_linears").mkdir(parents=True)
    (src / "sparsec_count_linears" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    (src / "pyproject.toml").write_text(PYPROJECT)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", str(site), str(src)], check=True)
    env = {"PYTHONPATH": str(site)}
    listed = run_cli("passes", env=env)
    assert "count-linears" in listed.stdout, listed.stderr
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[pass]]\nname = "count-linears"\nminimum = 3\n')
    out = tmp_path / "out"
    r = run_cli("compile", tiny_llama_path, "--recipe", recipe, "-o", out, env=env)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    # 2 blocks × (q, k, v, o, gate, up, down) + the tied lm head
    assert report["passes"][0] == {**report["passes"][0], "name": "count-linears",
                                   "stats": {"linears": 15}}
    bad = tmp_path / "bad.toml"
    bad.write_text('[[pass]]\nname = "count-linears"\nminimum = -1\n')
    r = run_cli("compile", tiny_llama_path, "--recipe", bad, env=env)
    assert r.returncode == 2 and "bad.toml:3" in r.stderr and "out of range" in r.stderr


MY_PASSES = '''
from dataclasses import dataclass

import torch

from sparsec import Pass, PassResult, register


@register
@dataclass(frozen=True)
class CountSdpa(Pass):
    """Counts SDPA nodes; changes nothing."""

    name = "count-sdpa"
    summary = "count attention nodes"

    def run(self, program):
        n = len(program.call_nodes(torch.ops.aten.scaled_dot_product_attention.default))
        return PassResult(modified=False, stats={"sdpa": n})
'''


def _passes_report(out):
    return {p["name"]: p["stats"] for p in json.loads((out / "report.json").read_text())["passes"]}


def test_plugin_option_and_env_var(tmp_path, run_cli, tiny_llama_path):
    (tmp_path / "my_passes.py").write_text(MY_PASSES)
    env = {"PYTHONPATH": str(tmp_path)}
    out = tmp_path / "a"
    r = run_cli("compile", tiny_llama_path, "--plugin", "my_passes", "--pass", "count-sdpa",
                "-o", out, env=env)
    assert r.returncode == 0, r.stderr
    assert _passes_report(out) == {"count-sdpa": {"sdpa": 2}}
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[pass]]\nname = "count-sdpa"\n')
    out = tmp_path / "b"
    r = run_cli("compile", tiny_llama_path, "--recipe", recipe, "-o", out,
                env={"SPARSEC_PLUGINS": str(tmp_path / "my_passes.py")})
    assert r.returncode == 0, r.stderr
    assert _passes_report(out) == {"count-sdpa": {"sdpa": 2}}


def test_unknown_pass_and_plugin_errors(tmp_path, run_cli, tiny_llama_path):
    r = run_cli("compile", tiny_llama_path, "--pass", "count-sdpa")
    assert r.returncode == 2 and "--plugin" in r.stderr and "entry point" in r.stderr
    r = run_cli("compile", tiny_llama_path, "--plugin", "no_such_module_19", "--pass", "x")
    assert r.returncode == 2
    assert r.stderr.startswith("error: --plugin no_such_module_19: importing it raised "
                               "ModuleNotFoundError"), r.stderr
    assert "Traceback" not in r.stderr

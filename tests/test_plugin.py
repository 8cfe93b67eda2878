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

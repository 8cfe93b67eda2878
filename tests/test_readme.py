"""The README's code runs as written."""

import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _block(word: str) -> str:
    return next(b for b in _python_blocks() if word in b)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("examples.tiny_llama", None)
    sys.modules.pop("examples", None)


def test_recipe_block_parses():
    import sparsec

    text = re.findall(r"```toml\n(version = 1.*?)```", (ROOT / "README.md").read_text(),
                      flags=re.S)[0]
    names = [p.name for p in sparsec.parse_recipe(text)]
    assert names == ["sparse-finetune", "block-sparse-attention", "joint-graph",
                     "prune-backward", "reduce-saved"]


def test_python_api_block_runs(workdir):
    scope: dict = {}
    exec(_block("sparsec.trace("), scope)
    assert (workdir / "out" / "api" / "model.onnx").exists()
    assert scope["logits"][0].shape == (2, 32, 256)


def test_custom_pass_block_registers_a_working_pass(workdir):
    import sparsec
    from sparsec.testing import check_pass, inputs_for, strategies

    scope: dict = {}
    exec(_block("class DropNoopViews"), scope)
    cls = sparsec.get_pass("drop-noop-views")
    recipe = workdir / "r.toml"
    recipe.write_text('[[pass]]\nname = "drop-noop-views"\n')
    compiled = sparsec.compile("examples/tiny_llama.py", recipe=recipe)
    assert compiled.program.history[0].name == "drop-noop-views"
    class NoopView(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x.reshape(x.shape)) + x.view(2, 6).view(3, 4)

    result = check_pass(cls(), NoopView(), (torch.randn(3, 4),))
    assert result.stats == {"dropped": 1}
    test_scope = {**scope, "check_pass": check_pass, "inputs_for": inputs_for,
                  "strategies": strategies}
    exec(_block("def test_drop_noop_views"), test_scope)
    test_scope["test_drop_noop_views"]()  # runs the hypothesis test as written

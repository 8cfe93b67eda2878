"""The README's code runs as written."""

import json
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


def _sh_block(heading: str) -> list[str]:
    """The commands of the first ```sh block after `heading`, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", text[text.index(heading):], flags=re.S)[1]
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def test_readme_commands_do_not_collide_on_out():
    outs = [c.split(" -o ")[1].split()[0] for c in _sh_block("## Compile a model")
            if " -o " in c]
    assert len(outs) == len(set(outs)) and "out/demo" not in outs  # make demo's


@pytest.mark.slow
def test_from_an_hf_checkpoint_commands_run(workdir, run_cli):
    """The section's commands as written, on a tiny checkpoint, with fewer steps and tokens."""
    import shlex

    from sparsec.testing.hf_dirs import chat_rows, make_dir, write_jsonl

    make_dir(workdir / "ckpt")
    write_jsonl(workdir / "train.jsonl", chat_rows(16))
    write_jsonl(workdir / "eval.jsonl", chat_rows(6))
    small = {"--steps": "3", "--seq-len": "8", "--eval-every": "2"}
    for command in _sh_block("## From an HF checkpoint"):
        args = shlex.split(command)
        assert args[0] == "sparsec"
        args = [small.get(prev, a) for prev, a in zip([""] + args, args)]
        r = run_cli(*args[1:], cwd=workdir)
        assert r.returncode == 0, f"{command}: {r.stderr}"
    report = json.loads((workdir / "out/hf-ft/report.json").read_text())
    assert report["eval"]["losses"][-1][0] == 3 and report["source"]["data"] == "train.jsonl"
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(workdir / "out/hf-merged").eval()
    base = AutoModelForCausalLM.from_pretrained(workdir / "ckpt")
    adapted = PeftModel.from_pretrained(base, workdir / "out/hf-shira").eval()
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(input_ids=ids).logits, atol=1e-5)
    assert (workdir / "out/hf-onnx/model.onnx").exists()

from pathlib import Path

import pytest
import torch

from sparsec import BadInputError, trace, trace_file

BAD = Path(__file__).parent / "bad_inputs"


@pytest.mark.parametrize("name, words", [
    ("missing.py", "no such file"),
    ("raises_on_import.py",
     "raises_on_import.py:3: importing raises_on_import.py raised ValueError"),
    ("syntax_error.py", "syntax_error.py:3: syntax error"),
    ("no_model.py", "defines no model() function"),
    ("not_a_module.py", "model() returned function, not a torch.nn.Module"),
    ("wrong_inputs.py", "example_inputs() returned dict"),
    ("data_dependent.py", "data_dependent.py:11: `if y.sum() > 0:` cannot trace the model: "
                          "data-dependent control flow"),
    ("shape_error.py", "cannot trace the model: the model raised RuntimeError"),
])
def test_bad_model_files_get_one_line(name, words):
    with pytest.raises(BadInputError) as e:
        trace_file(BAD / name)
    assert words in str(e.value)
    assert "\n" not in str(e.value)


def test_directory_is_not_a_model_file(tmp_path):
    with pytest.raises(BadInputError, match="is a directory"):
        trace_file(tmp_path)


def test_trace_keeps_linear_and_sdpa_whole(tiny_llama_program):
    targets = {n.target for n in tiny_llama_program.gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.linear.default in targets
    assert torch.ops.aten.scaled_dot_product_attention.default in targets
    assert tiny_llama_program.state["trace_check"]["max_rel_err"] <= 1e-6


def test_trace_file_keeps_training_hooks(tiny_llama_program):
    src = tiny_llama_program.source
    assert src.name == "tiny_llama" and callable(src.loss) and callable(src.batches)
    batch = next(iter(src.batches()))
    out = tiny_llama_program.gm(*batch)
    assert torch.isfinite(src.loss(out, batch))


def test_trace_rejects_non_modules():
    with pytest.raises(BadInputError, match="takes a torch.nn.Module"):
        trace(lambda x: x, (torch.randn(2),))

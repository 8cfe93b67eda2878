"""sparsec.testing catches a planted bug and shrinks it to a runnable minimal model."""

from dataclasses import dataclass

import pytest
import torch
from hypothesis import settings

from sparsec import Pass, PassResult
from sparsec.passes.cleanup import DeadCode
from sparsec.testing import check_pass
from sparsec.testing.check import PassPropertyError, assert_pass_preserves


@dataclass(frozen=True)
class DropResidual(Pass):
    """Planted bug: `a + b` becomes `a` when both are tensors of the same shape."""

    name = "drop-residual"

    def run(self, program):
        dropped = 0
        for node in program.call_nodes(torch.ops.aten.add.Tensor):
            a, b = node.args[:2]
            if all(hasattr(x, "meta") and x.meta["val"].shape == node.meta["val"].shape
                   for x in (a, b)):
                node.replace_all_uses_with(a)
                program.gm.graph.erase_node(node)
                dropped += 1
        return PassResult(dropped > 0, {"dropped": dropped})


def test_planted_bug_is_caught_and_shrunk_to_a_runnable_snippet():
    with pytest.raises(PassPropertyError) as e:
        assert_pass_preserves(DropResidual(), settings=settings(max_examples=60, derandomize=True))
    message = str(e.value)
    assert "changed the outputs" in message
    snippet = message.split("\n\n")[1]
    scope: dict = {}
    exec(snippet, scope)  # the snippet rebuilds the minimal model and its inputs
    model, inputs = scope["model"], scope["inputs"]
    assert len(model.spec.layers) == 1  # shrunk to one residual block
    assert model.spec.layers[0].kind in ("mlp", "attention")
    with pytest.raises(Exception, match="changed the outputs"):
        check_pass(DropResidual(), model, inputs)


def test_a_correct_pass_passes():
    assert_pass_preserves(DeadCode(), onnx=False)


def test_onnx_parity_is_checked_for_exportable_passes():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    result = check_pass(DeadCode(), model, (torch.randn(3, 4),), onnx=True)
    assert not result.modified

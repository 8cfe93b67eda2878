"""Random models through random valid recipes: no crash and no verification failure.

CI draws a bounded number; `make test-nightly` (profile `nightly`) draws ten times as many.
"""

from hypothesis import given

from sparsec import BadInputError, ModelSource, run_passes, trace
from sparsec.testing import strategies as sst
from sparsec.testing.pytest_plugin import examples

# What a drawn model may legitimately lack: layers to fine-tune, something left to train.
REFUSALS = ("nothing is trainable", "match no linear layer", "no linear layer inside")


def _loss(out, batch):
    return (out.float() ** 2).mean()


@examples(8)
@given(model=sst.models(max_layers=3, lengths=(16, 40)), passes=sst.recipes(max_passes=4))
def test_random_recipes_on_random_models(model, passes):
    program = trace(model, sst.inputs_for(model))
    program.source = ModelSource(name="random", loss=_loss)
    try:
        out = run_passes(program, passes, verify=True)
    except BadInputError as e:  # a clean refusal is right when the model lacks what a pass needs
        assert any(reason in str(e) for reason in REFUSALS), e
        return
    assert [r.name for r in out.history] == [p.name for p in passes]

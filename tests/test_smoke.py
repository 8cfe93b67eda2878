from hypothesis import given

from sparsec.passes.cleanup import DeadCode
from sparsec.testing import check_pass
from sparsec.testing import strategies as sst


@given(sst.models())
def test_dead_code_preserves_random_models(model):
    check_pass(DeadCode(), model, sst.inputs_for(model))

"""Public testing tools: `check_pass`, hypothesis strategies (`sparsec.testing.strategies`)
and the model zoo (`sparsec.testing.zoo`)."""

from . import zoo
from .check import PassCheck, PassPropertyError, assert_pass_preserves, check_pass
from .models import LayerSpec, ModelSpec, RandomModel, build_model, inputs_for

__all__ = ["check_pass", "assert_pass_preserves", "PassPropertyError", "PassCheck", "LayerSpec",
           "ModelSpec", "RandomModel", "build_model", "inputs_for", "zoo"]

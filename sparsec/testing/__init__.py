"""Public testing tools: `check_pass`, hypothesis strategies (`sparsec.testing.strategies`)
and the model zoo (`sparsec.testing.zoo`)."""

from . import zoo
from .check import PassCheck, check_pass
from .models import LayerSpec, ModelSpec, RandomModel, build_model, inputs_for

__all__ = ["check_pass", "PassCheck", "LayerSpec", "ModelSpec", "RandomModel", "build_model",
           "inputs_for", "zoo"]

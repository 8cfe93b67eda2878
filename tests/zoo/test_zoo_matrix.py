"""The zoo matrix: every `sparsec.testing.zoo` model through every feature, on the CPU.

One cell is `zoo_matrix.run_cell(model, feature)` (sparsec/testing/zoo_matrix.py says what
each feature checks). Built models and traced programs are made once per worker process and
shared by that model's cells. Cells that fail today because of a sparsec bug are strict xfails naming
the failure class of issue 16: they turn red (XPASS) the moment the bug is fixed — then
delete the entry from KNOWN_FAILURES.
"""

from __future__ import annotations

import os

import pytest

from sparsec.testing import zoo, zoo_matrix

# (model, feature) → "<failure class>: <one line>"
KNOWN_FAILURES: dict[tuple[str, str], str] = {}

# SPARSEC_ZOO picks the cells. "full" (make test-nightly, the GPU run): every cell. "ci" (the
# default, make test): every cell but the ONNX, joint and deploy cells (4-20 s each on the
# 2-core CI machine) of models whose architecture another model already covers there: the
# Llama-family decoders share llama's and gemma2's graph, minilm is bert with real weights,
# and deploy (train, then export) is shown on one model of each family. "quick": those three
# features only on the models that carry their failure classes (under 1 min).
MODE = os.environ.get("SPARSEC_ZOO", "ci")
if MODE not in ("quick", "ci", "full"):
    raise pytest.UsageError(f"SPARSEC_ZOO={MODE!r}; choose quick, ci or full")
_SAME_GRAPH = {"mistral", "qwen2", "qwen3", "phi3", "gemma", "minilm"}
SKIPPED = {
    "quick": {"onnx": set(zoo.names()) - {"bert", "llama", "gpt2"},
              "joint": set(zoo.names()) - {"bert", "llama-tied", "t5-encoder"},
              "deploy": set(zoo.names()) - {"llama"}},
    "ci": {"onnx": _SAME_GRAPH, "joint": {"minilm"},
           "deploy": set(zoo.names()) - {"llama", "bert", "gpt2", "t5-encoder", "vit"}},
    "full": {},
}[MODE]
EXPENSIVE = ("onnx", "joint", "deploy")
SLOW_MODELS = {"minilm", "gpt2"}

_MODELS: dict[str, zoo_matrix.MatrixModel] = {}


def _model(name: str) -> zoo_matrix.MatrixModel:
    if name not in _MODELS:
        _MODELS[name] = zoo_matrix.MatrixModel(zoo.get(name), zoo_matrix.MatrixConfig())
    return _MODELS[name]


def _cells():
    for name in zoo.names():
        for feature in zoo_matrix.FEATURES:
            if name in SKIPPED.get(feature, ()):
                continue
            marks = []
            if (name, feature) in KNOWN_FAILURES:
                marks.append(pytest.mark.xfail(strict=True,
                                               reason=KNOWN_FAILURES[name, feature]))
            if feature in EXPENSIVE or name in SLOW_MODELS:
                marks.append(pytest.mark.slow)
            yield pytest.param(name, feature, marks=marks, id=f"{name}-{feature}")


@pytest.mark.parametrize(("name", "feature"), list(_cells()))
def test_zoo_cell(name, feature):
    zoo_matrix.run_cell(_model(name), feature)


def test_known_failures_name_real_cells():
    for name, feature in KNOWN_FAILURES:
        assert name in zoo.ZOO and feature in zoo_matrix.FEATURES, (name, feature)

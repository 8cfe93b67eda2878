"""Hypothesis strategies for sparsec: random small models and their inputs.

    from hypothesis import given
    from sparsec.testing import strategies as sst

    @given(sst.models())
    def test_my_pass(model):
        check_pass(MyPass(), model, sst.inputs_for(model))
"""

from __future__ import annotations

from hypothesis import strategies as st

from .models import (
    ATTENTION_FORMS,
    NOT_ATTENTION_FORMS,
    LayerSpec,
    ModelSpec,
    RandomModel,
    build_model,
    inputs_for,
)

__all__ = ["layer_specs", "model_specs", "models", "inputs_for", "recipes", "pass_options",
           "layouts"]


@st.composite
def layer_specs(draw, dim: int, attention: bool = True, look_alikes: bool = True) -> LayerSpec:
    kinds = ["linear", "conv1x1", "norm", "act", "mlp"] + (["attention"] if attention else [])
    kind = draw(st.sampled_from(kinds))
    if kind in ("linear", "conv1x1"):
        return LayerSpec(kind, (("bias", draw(st.booleans())),))
    if kind == "norm":
        return LayerSpec("norm", (("type", draw(st.sampled_from(["layer", "rms"]))),))
    if kind == "act":
        return LayerSpec("act", (("fn", draw(st.sampled_from(["relu", "gelu", "silu", "tanh"]))),))
    if kind == "mlp":
        hidden = draw(st.sampled_from([dim, 2 * dim, 3 * dim]))
        return LayerSpec("mlp", (("bias", draw(st.booleans())), ("gated", draw(st.booleans())),
                                 ("hidden", hidden)))
    heads = draw(st.sampled_from([h for h in (1, 2, 4) if dim % h == 0]))
    kv_heads = draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0]))
    forms = ATTENTION_FORMS + (NOT_ATTENTION_FORMS if look_alikes else ())
    return LayerSpec("attention", (("form", draw(st.sampled_from(forms))),
                                   ("gqa", draw(st.sampled_from(["expand", "repeat_interleave"]))),
                                   ("heads", heads), ("kv_heads", kv_heads)))


@st.composite
def model_specs(draw, *, max_layers: int = 4, attention: bool = True, look_alikes: bool = True,
                dtypes: tuple[str, ...] = ("float32",), lengths: tuple[int, int] = (1, 12),
                embeddings: bool = True) -> ModelSpec:
    """Specs of random models. `look_alikes` adds softmax blocks that are not attention (the
    attention pass must leave them alone); `embeddings` lets the model start from token ids."""
    dim = draw(st.sampled_from([8, 16, 32]))
    layers = draw(st.lists(layer_specs(dim, attention, look_alikes), min_size=1,
                           max_size=max_layers))
    dtype = draw(st.sampled_from(dtypes))
    vocab = draw(st.sampled_from([0, 0, 50])) if embeddings and dtype == "float32" else 0
    return ModelSpec(dim=dim, layers=tuple(layers), batch=draw(st.integers(1, 3)),
                     length=draw(st.integers(*lengths)), dtype=dtype,
                     seed=draw(st.integers(0, 2**16)), vocab=vocab)


def models(**kwargs) -> st.SearchStrategy[RandomModel]:
    """Random small models (Linear/norm/activation/MLP/attention stacks); see `model_specs`."""
    return model_specs(**kwargs).map(build_model)


# recipes ---------------------------------------------------------------------------------------
def pass_options(cls) -> st.SearchStrategy[dict]:
    """Option dicts for a pass class: its `hypothesis_options()` if it defines one, else drawn
    from each option's declared choices and ranges (others keep their defaults)."""
    custom = getattr(cls, "hypothesis_options", None)
    if custom is not None:
        return custom()
    from ..passes.base import option_specs

    fields = {}
    for spec in option_specs(cls):
        s = _option_strategy(spec)
        if s is not None:
            fields[spec["name"]] = s
    return st.fixed_dictionaries(fields)


def _option_strategy(spec: dict):
    if spec["choices"]:
        return st.sampled_from(spec["choices"])
    default, lo, hi = spec["default"], spec["min"], spec["max"]
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int) and lo is not None and hi is not None:
        return st.integers(int(lo), int(hi))
    if isinstance(default, float) and lo is not None and hi is not None:
        return st.floats(float(lo), float(hi), allow_nan=False)
    return None


@st.composite
def recipes(draw, *, max_passes: int = 4, stages: tuple[str, ...] = ("forward", "joint"),
            exclude: tuple[str, ...] = ()) -> list:
    """Valid pass lists: each drawn pass has its `requires` met by the passes before it.

    Joint-stage passes need a loss on the program (attach one with
    `program.source = ModelSource(name, loss=...)`).
    """
    from ..passes.base import registered_passes, stage_of
    from ..program import Prop

    pool = {n: c for n, c in registered_passes().items()
            if n not in exclude and not n.startswith("test-")
            and (stage_of(c) in stages or n == "joint-graph" and "joint" in stages)}
    props: set[str] = {Prop.FORWARD_GRAPH}
    passes = []
    for _ in range(draw(st.integers(0, max_passes))):
        ready = sorted(n for n, c in pool.items() if set(c.requires) <= props)
        if not ready:
            break
        cls = pool[draw(st.sampled_from(ready))]
        passes.append(cls(**draw(pass_options(cls))))
        props = (props - set(cls.invalidates)) | set(cls.establishes)
    return passes


# layouts ---------------------------------------------------------------------------------------
@st.composite
def layouts(draw, *, max_len: int = 160, heads: int = 2):
    """Block layouts of every static family (and per-head mixtures of them) for awkward
    lengths: not divisible by the block, one block, kv longer than q."""
    from .. import layouts as L

    block = draw(st.sampled_from((16, 32)))
    q_len = draw(st.integers(1, max_len))
    kv_len = draw(st.sampled_from((q_len, q_len + draw(st.integers(1, 40)))))
    causal = draw(st.booleans()) and kv_len == q_len
    kw = dict(block=block, causal=causal)
    tok = st.sampled_from((0, 16, 32, 64))
    builders = {
        "dense": lambda: L.dense(q_len, kv_len, **kw),
        "sliding-window": lambda: L.sliding_window(q_len, kv_len, window=draw(tok),
                                                   sink=draw(tok), **kw),
        "strided": lambda: L.strided(q_len, kv_len, stride=draw(st.sampled_from((16, 32, 64))),
                                     window=draw(tok), **kw),
        "dilated": lambda: L.dilated(q_len, kv_len, window=draw(tok),
                                     dilation=draw(st.integers(1, 3)), **kw),
        "bigbird": lambda: L.bigbird(q_len, kv_len, window=draw(tok),
                                     global_tokens=draw(st.sampled_from((0, 16))),
                                     random_blocks=draw(st.integers(0, 2)),
                                     seed=draw(st.integers(0, 9)), **kw),
    }
    names = sorted(builders)
    if draw(st.booleans()):
        return builders[draw(st.sampled_from(names))]()
    return L.per_head([builders[draw(st.sampled_from(names))]() for _ in range(heads)])

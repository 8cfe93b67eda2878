"""The layout table (`sparsec.layouts.spec.KINDS`): one strategy object per layout, the one
place the attention pass and its reference read a layout's options, inputs and selection
from."""

import dataclasses

import pytest
import torch

from sparsec.errors import OptionError
from sparsec.layouts.block_layout import BlockLayout, block_geometry
from sparsec.layouts.spec import KINDS, LAYOUTS, STATIC_LAYOUTS, build_static, kind_of
from sparsec.passes.attention import BlockSparseAttention


def _opts(**kw):
    return {**BlockSparseAttention(block=16).options(), **kw}


class _Site:
    q_len = kv_len = 128
    heads, kv_heads, head_dim = 4, 2, 8
    causal, scale, name = True, 8 ** -0.5, "layers.0.attn"


def test_every_layout_option_is_a_pass_option():
    fields = {f.name for f in dataclasses.fields(BlockSparseAttention)}
    for spec in KINDS.values():
        assert set(spec.options) <= fields, spec.name


def test_static_layouts_build_and_dynamic_ones_refuse():
    assert set(LAYOUTS) == set(KINDS)
    for name in LAYOUTS:
        opts = _opts(layout=name, mixture=("sliding-window", "dense"))
        if name in STATIC_LAYOUTS:
            lay = build_static(name, opts, 64, 64, 4, True)
            assert lay.q_len == 64 and lay.heads == (4 if kind_of(name).per_head else 1)
        else:
            with pytest.raises(OptionError, match="is not static"):
                build_static(name, opts, 64, 64, 4, True)


def test_static_inputs_are_the_layout_tensors_and_select_passes_them_through():
    spec = kind_of("sliding-window")
    lay = spec.build(_opts(), 64, 64, 1, True)
    inputs = spec.graph_inputs(_opts(), _Site(), 0, lay)
    assert [i.name.rsplit(".", 1)[-1] for i in inputs] == \
        ["kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"]
    tensors = tuple(i.tensor for i in inputs)
    assert spec.select(_opts(), _Site(), None, None, tensors) is tensors


@pytest.mark.parametrize("name", ["topk", "threshold", "vertical-slash", "learned"])
def test_dynamic_select_keeps_what_reference_keep_keeps(name):
    """The graph's selection (the ops) and the reference's (plain torch) choose the same
    blocks on inputs without near-ties."""
    torch.manual_seed(0)
    spec, site = kind_of(name), _Site()
    opts = _opts(layout=name, topk=1, threshold=0.5, window=16, sink=16, vertical=2, slash=1)
    q = torch.randn(1, 4, 128, 8, dtype=torch.float64)
    k = torch.randn(1, 2, 128, 8, dtype=torch.float64)
    inputs = tuple(i.tensor.double() for i in spec.graph_inputs(opts, site, 0, None))
    assert all(i.parameter for i in spec.graph_inputs(opts, site, 0, None))
    assert (len(inputs) == 2) == (name == "learned")
    lay = BlockLayout(*[t.to(torch.int32) for t in spec.select(opts, site, q, k, inputs)],
                      128, 128, 16, 16, True)
    valid, _ = block_geometry(128, 128, 16, 16, True, q.device)
    keep = spec.reference_keep(opts, site, q, k, inputs) & valid
    assert 0.2 < lay.density() < 0.9
    assert torch.equal(lay.to_dense_blocks(), keep)


def test_options_are_checked_by_the_layout():
    with pytest.raises(OptionError, match="threshold' must be > 0"):
        kind_of("threshold").check(_opts(threshold=0.0))
    with pytest.raises(OptionError, match="topk' must be ≥ 1"):
        kind_of("topk").check(_opts(topk=0))
    with pytest.raises(OptionError, match="must list static layouts"):
        kind_of("mixture").check(_opts(mixture=("topk",)))
    kind_of("learned").check(_opts(topk=0))  # learned takes topk as it is

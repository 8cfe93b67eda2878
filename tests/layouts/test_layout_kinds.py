"""The layout table (`sparsec.layouts.spec.KINDS`) is the one place the attention pass and
its reference read a layout's options, kind and selection from."""

import dataclasses

from sparsec.layouts.spec import KINDS, LAYOUTS, STATIC_LAYOUTS, kind_of
from sparsec.passes.attention import BlockSparseAttention


def test_every_layout_option_is_a_pass_option():
    fields = {f.name for f in dataclasses.fields(BlockSparseAttention)}
    for kind in KINDS.values():
        assert set(kind.options) <= fields, kind.name


def test_static_layouts_have_no_selection_and_dynamic_ones_one():
    assert set(LAYOUTS) == set(KINDS)
    for name in LAYOUTS:
        kind = kind_of(name)
        if name in STATIC_LAYOUTS:
            assert kind.static and kind.selection is None
        else:
            assert not kind.static and kind.selection in ("scores", "vertical-slash", "gate")

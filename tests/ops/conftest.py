"""Fixture `backward_targets`: the ops in the backward graph AOTAutograd traces for a function."""

from __future__ import annotations

import pytest
from functorch.compile import aot_function, make_boxed_func


@pytest.fixture
def backward_targets():
    return _backward_targets


def _backward_targets(fn, *args) -> list[str]:
    seen: list[str] = []

    def fw(gm, _):
        return make_boxed_func(gm.forward)

    def bw(gm, _):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    out = aot_function(fn, fw_compiler=fw, bw_compiler=bw)(*args)
    out.sum().backward()
    return seen

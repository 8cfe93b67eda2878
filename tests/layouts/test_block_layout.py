"""BlockLayout format, conversions and the static builders against token-level brute force."""

from __future__ import annotations

import math

import pytest
import torch

from sparsec.errors import BadInputError
from sparsec.layouts import BlockLayout, bigbird, dense, dilated, per_head, sliding_window, strided
from sparsec.layouts.block_layout import block_geometry


def brute_blocks(rule, L, S, bq, bk):
    """keep[i, j] = some in-range (t, s) of block (i, j) satisfies rule(t, s)."""
    nq, nkv = math.ceil(L / bq), math.ceil(S / bk)
    keep = torch.zeros(nq, nkv, dtype=torch.bool)
    for t in range(L):
        for s in range(S):
            if rule(t, s):
                keep[t // bq, s // bk] = True
    return keep


def brute_elements(keep, L, S, bq, bk, causal):
    t = torch.arange(L)[:, None]
    s = torch.arange(S)[None, :]
    m = keep[t // bq, s // bk]
    return m & (s <= t) if causal else m


def window_rule(window, sink, causal):
    def rule(t, s):
        d = t - s
        near = (0 <= d < window) if causal else (abs(d) < window)
        return near or s < sink
    return rule


@pytest.mark.parametrize("L,S,bq,bk,causal", [(70, 70, 16, 16, True), (50, 83, 16, 32, False),
                                              (16, 16, 16, 16, True), (33, 33, 32, 16, True)])
def test_csr_round_trip_and_invariants(L, S, bq, bk, causal):
    g = torch.Generator().manual_seed(L + S)
    nq, nkv = math.ceil(L / bq), math.ceil(S / bk)
    keep = torch.rand(2, 3, nq, nkv, generator=g) < 0.5
    lay = BlockLayout.from_dense_blocks(keep, L, S, bq, bk, causal)
    lay.validate()
    valid, partial = block_geometry(L, S, bq, bk, causal)
    kinds = lay.block_kinds()
    assert torch.equal(kinds > 0, keep & valid)
    assert torch.equal(kinds == 2, keep & valid & ~partial)  # full iff no masking needed
    assert lay.kv_num_blocks.dtype == torch.int32 and lay.kv_indices.dtype == torch.int32
    assert torch.equal(lay.to_element_mask(), brute_elements_batched(keep, L, S, bq, bk, causal))


def brute_elements_batched(keep, L, S, bq, bk, causal):
    return torch.stack([torch.stack([brute_elements(keep[b, h], L, S, bq, bk, causal)
                                     for h in range(keep.shape[1])]) for b in range(keep.shape[0])])


def test_partial_blocks_are_diagonal_and_ragged_tail():
    lay = dense(40, block=16, causal=True)  # 3 blocks, last key block ragged (8 of 16)
    kinds = lay.block_kinds()[0, 0]
    assert kinds.tolist() == [[1, 0, 0], [2, 1, 0], [2, 2, 1]]
    lay = dense(40, block=16, causal=False)
    assert lay.block_kinds()[0, 0].tolist() == [[2, 2, 1]] * 3


@pytest.mark.parametrize("L,S,bq,bk,causal,window,sink", [
    (70, 70, 16, 16, True, 20, 5), (70, 70, 16, 16, False, 17, 0), (50, 83, 16, 32, False, 40, 30),
    (64, 64, 16, 16, True, 1, 0), (64, 64, 32, 16, True, 100, 16)])
def test_sliding_window_matches_token_rule(L, S, bq, bk, causal, window, sink):
    lay = sliding_window(L, S, block_q=bq, block_kv=bk, window=window, sink=sink, causal=causal)
    lay.validate()
    keep = brute_blocks(window_rule(window, sink, causal), L, S, bq, bk)
    want = brute_elements(keep, L, S, bq, bk, causal)
    assert torch.equal(lay.to_element_mask()[0, 0], want)
    valid = block_geometry(L, S, bq, bk, causal)[0]
    assert lay.density() == pytest.approx(float((keep & valid).sum()) / float(valid.sum()))
    assert lay.grid() == ("causal" if causal else "full")


def test_strided_matches_token_rule():
    L, b, stride, window = 150, 16, 48, 20
    lay = strided(L, block=b, stride=stride, window=window, sink=0)

    def rule(t, s):
        return window_rule(window, 0, True)(t, s) or (s + 1) % stride == 0
    keep = brute_blocks(rule, L, L, b, b)
    assert torch.equal(lay.to_element_mask()[0, 0], brute_elements(keep, L, L, b, b, True))


def test_dilated_keeps_every_other_block_in_window():
    lay = dilated(128, block=16, window=128, dilation=2, sink=0)
    kinds = lay.block_kinds()[0, 0]
    for i in range(8):
        kept = {j for j in range(8) if kinds[i, j] > 0}
        assert kept == {j for j in range(i + 1) if (i - j) % 2 == 0}
    assert torch.equal(dilated(100, block=16, window=40, dilation=1).to_element_mask(),
                       sliding_window(100, block=16, window=40).to_element_mask())


def test_bigbird_fixed_parts_random_blocks_and_seed():
    L, b = 256, 16
    kw = dict(block=b, window=32, global_tokens=16, random_blocks=2, heads=3)
    lay = bigbird(L, seed=1, **kw)
    lay.validate()
    kinds = lay.block_kinds()[0]
    fixed = brute_blocks(window_rule(32, 16, True), L, L, b, b)
    fixed[0, :] = True  # the global query block sees everything (causally)
    valid = block_geometry(L, L, b, b, True)[0]
    assert bool(((kinds > 0) | ~(fixed & valid)).all())
    extra = ((kinds > 0) & ~fixed).sum(-1)
    room = (valid & ~fixed).sum(-1)
    assert torch.equal(extra, torch.minimum(room, torch.tensor(2)).expand_as(extra))
    assert not torch.equal(kinds[0], kinds[1])  # per-head randomness
    assert torch.equal(bigbird(L, seed=1, **kw).block_kinds(), lay.block_kinds())
    assert not torch.equal(bigbird(L, seed=2, **kw).block_kinds(), lay.block_kinds())


def test_per_head_mixture_stacks_heads():
    a, b = sliding_window(64, block=16, window=16, sink=0), dense(64, block=16)
    mix = per_head([a, b, a])
    assert mix.heads == 3
    assert torch.equal(mix.block_kinds()[0, 1], b.block_kinds()[0, 0])
    assert torch.equal(mix.block_kinds()[0, 2], a.block_kinds()[0, 0])
    with pytest.raises(BadInputError, match="share lengths"):
        per_head([a, dense(80, block=16)])


def test_bad_inputs_raise_one_line_errors():
    with pytest.raises(BadInputError, match="choose one of 16, 32, 64, 128"):
        sliding_window(64, block=48)
    with pytest.raises(BadInputError, match="window is -1"):
        sliding_window(64, block=16, window=-1)
    lay = dense(64, block=16)
    broken = BlockLayout(lay.kv_num_blocks, lay.kv_indices, lay.full_kv_num_blocks,
                         lay.full_kv_indices.flip(-1), 64, 64, 16, 16, True)
    with pytest.raises(BadInputError, match="ascending"):
        broken.validate()


def test_empty_layout_has_zero_density():
    lay = sliding_window(64, block=16, window=0, sink=0)
    assert lay.density() == 0.0 and int(lay.kept_blocks().sum()) == 0
    assert not lay.to_element_mask().any()

"""Dynamic selection against per-row brute force; fixed shapes and no host sync."""

from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from sparsec.layouts import BlockLayout
from sparsec.layouts.block_layout import block_geometry
from sparsec.layouts.dynamic import (
    forced_blocks,
    pool_blocks,
    pooled_block_scores,
    select_from_scores,
    select_keep,
    select_vertical_slash,
    vertical_slash_keep,
)
from sparsec.ops.block_select import block_scores_op, select_blocks_op, select_vertical_slash_op


def test_pool_blocks_means_ragged_tail():
    x = torch.randn(2, 3, 37, 4, dtype=torch.float64)
    got = pool_blocks(x, 16)
    for i, (a, b) in enumerate([(0, 16), (16, 32), (32, 37)]):
        torch.testing.assert_close(got[:, :, i], x[:, :, a:b].mean(2))


def test_pooled_scores_are_block_softmax_with_gqa():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 40, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 40, 8, generator=g, dtype=torch.float64)
    p = pooled_block_scores(q, k, 0.5, True, 16, 16)
    for h in range(4):
        qp = torch.stack([q[0, h, a:a + 16].mean(0) for a in (0, 16, 32)])
        kp = torch.stack([k[0, h // 2, a:a + 16].mean(0) for a in (0, 16, 32)])
        logits = (qp @ kp.T * 0.5).masked_fill(torch.ones(3, 3).triu(1).bool(), float("-inf"))
        torch.testing.assert_close(p[0, h], torch.softmax(logits, -1))


def brute_select(scores, forced, valid, topk, threshold):
    keep = forced.clone().expand_as(scores).clone()
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in scores.shape[:3]]):
        b, h, i = idx.tolist()
        row = scores[b, h, i]
        cands = [j for j in range(row.numel()) if valid[i, j] and not forced[i, j]]
        cands.sort(key=lambda j: -float(row[j]))
        mass = sum(float(row[j]) for j in range(row.numel()) if forced[i, j])
        cap = topk if topk > 0 else len(cands)
        for j in cands[:cap]:
            if threshold > 0 and mass >= threshold:
                break
            keep[b, h, i, j] = True
            mass += float(row[j])
    return keep


@pytest.mark.parametrize("L,topk,threshold,sink,window,causal", [
    (100, 2, 0.0, 16, 16, True), (100, 0, 0.8, 0, 16, True), (70, 3, 0.5, 20, 1, False),
    (64, 1, 0.0, 0, 0, True), (90, 2, 0.95, 0, 0, True)])
def test_select_matches_brute_force(L, topk, threshold, sink, window, causal):
    g = torch.Generator().manual_seed(L + topk)
    b = 16
    nq = math.ceil(L / b)
    valid = block_geometry(L, L, b, b, causal)[0]
    logits = torch.randn(2, 3, nq, nq, generator=g).masked_fill(~valid, float("-inf"))
    scores = torch.softmax(logits, -1)
    forced = forced_blocks(L, L, b, b, causal, sink, window)
    got = select_keep(scores, L, L, b, b, causal, topk, threshold, sink, window)
    assert torch.equal(got, brute_select(scores, forced, valid, topk, threshold) & valid)
    lay = BlockLayout(*select_from_scores(scores, L, L, b, b, causal, topk, threshold, sink,
                                          window), L, L, b, b, causal)
    lay.validate()
    assert torch.equal(lay.to_dense_blocks(), got)


def brute_vertical_slash(q, k, scale, causal, block, vertical, slash):
    L, S = q.shape[-2], k.shape[-2]
    rows = range((math.ceil(L / block) - 1) * block, L)
    keep = torch.zeros(q.shape[0], q.shape[1], math.ceil(L / block), math.ceil(S / block),
                       dtype=torch.bool)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            kh = k[b, h // (q.shape[1] // k.shape[1])]
            col, diag = torch.zeros(S, dtype=torch.float64), {}
            for t in rows:
                s_max = t + 1 if causal else S
                p = torch.softmax(q[b, h, t] @ kh[:s_max].T * scale, -1)
                col[:s_max] += p
                for s in range(s_max):
                    diag[t - s] = diag.get(t - s, 0.0) + float(p[s])
            cols = set(col.topk(vertical).indices.tolist())
            offs = set(sorted(diag, key=lambda o: -diag[o])[:slash])
            for t in range(L):
                for s in range(S if not causal else t + 1):
                    if s in cols or (t - s) in offs:
                        keep[b, h, t // block, s // block] = True
    return keep


def test_vertical_slash_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 70, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 70, 8, generator=g, dtype=torch.float64)
    got = vertical_slash_keep(q, k, 0.4, True, 16, 3, 2, sink=0, window=0)
    want = brute_vertical_slash(q, k, 0.4, True, 16, 3, 2)
    valid = block_geometry(70, 70, 16, 16, True)[0]
    assert torch.equal(got & valid, want)
    lay = BlockLayout(*select_vertical_slash(q, k, 0.4, True, 16, 3, 2, 16, 16), 70, 70, 16, 16,
                      True)
    lay.validate()
    assert bool((lay.to_dense_blocks() | ~(want | forced_blocks(70, 70, 16, 16, True, 16, 16)))
                .all())


def test_selection_has_fixed_shapes_without_host_sync():
    """Under fake tensors any .item()/host read would fail: the ops are trace-safe."""
    with FakeTensorMode():
        q = torch.empty(2, 4, 300, 16)
        k = torch.empty(2, 2, 300, 16)
        probs = block_scores_op(q, k, 0.25, True, 32, 32)
        outs = select_blocks_op(probs, 300, 300, True, 32, 32, 3, 0.0, 32, 64)
        vs = select_vertical_slash_op(q, k, 0.25, True, 32, 8, 4, 32, 64)
    assert probs.shape == (2, 4, 10, 10)
    assert [tuple(t.shape) for t in outs] == [(2, 4, 10), (2, 4, 10, 1), (2, 4, 10),
                                              (2, 4, 10, 7)]
    assert vs[3].shape[-1] == 10


@pytest.mark.parametrize("topk,threshold", [(2, 0.0), (0, 0.9)])
def test_selection_ops_pass_opcheck(topk, threshold):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 50, 8, generator=g), torch.randn(1, 1, 50, 8, generator=g)
    probs = block_scores_op(q, k, 0.3, True, 16, 16)
    torch.library.opcheck(block_scores_op, (q, k, 0.3, True, 16, 16))
    torch.library.opcheck(select_blocks_op, (probs, 50, 50, True, 16, 16, topk, threshold, 16,
                                             16))
    torch.library.opcheck(select_vertical_slash_op, (q, k, 0.3, True, 16, 2, 2, 0, 16))

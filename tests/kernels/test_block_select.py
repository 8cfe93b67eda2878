"""Dynamic block selection kernels against sparsec.layouts.dynamic (the reference).

Scores are compared with a float64 reference; selection must be identical, element for element,
on the same scores (ties included: the reference's stable order). CPU: Triton's interpreter,
small sizes; GPU (`-m gpu`): real sizes, and no host synchronization (CUDA sync debug mode
'error')."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from sparsec.kernels import block_select as K  # noqa: E402
from sparsec.layouts.dynamic import pooled_block_scores, select_from_scores  # noqa: E402
from sparsec.testing.kernels import kernel_device, poisoned, rel_err  # noqa: E402

DEV = kernel_device()


def qk(B, H, Hkv, L, S, D, dtype, seed, device=DEV):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, L, D, generator=g).to(device, dtype),
            torch.randn(B, Hkv, S, D, generator=g).to(device, dtype))


SCORE_CASES = [  # B, H, Hkv, L, S, D, bq, bk, causal, dtype
    (1, 1, 1, 16, 16, 16, 16, 16, True, torch.float32),
    (2, 4, 2, 77, 77, 24, 16, 32, True, torch.float32),
    (1, 2, 1, 50, 90, 16, 32, 16, False, torch.bfloat16),
    (1, 3, 3, 300, 300, 32, 16, 16, True, torch.float16),
]


@pytest.mark.parametrize("case", SCORE_CASES, ids=lambda c: "-".join(map(str, c[:9])))
def test_block_scores_match_reference(case):
    *shape, bq, bk, causal, dtype = case
    q, k = qk(*shape, dtype, seed=sum(shape))
    with poisoned():
        got = K.block_scores(q, k, 0.25, causal, bq, bk)
    want = pooled_block_scores(q.double().cpu(), k.double().cpu(), 0.25, causal, bq, bk)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert rel_err(got.cpu(), want) < 1e-5
    assert torch.equal(got.cpu() == 0, want == 0)  # invalid causal blocks exactly 0


SELECT_CASES = [  # L, S, bq, bk, causal, topk, threshold, sink, window
    (64, 64, 16, 16, True, 2, 0.0, 16, 16),
    (100, 100, 16, 16, True, 3, 0.0, 0, 0),
    (70, 130, 16, 32, False, 0, 0.8, 16, 32),
    (120, 120, 16, 16, True, 4, 0.6, 16, 16),
    (96, 96, 32, 16, True, 0, 0.95, 0, 32),
    (16, 16, 16, 16, True, 1, 0.5, 0, 0),
]


def _scores(B, H, L, S, bq, bk, causal, seed, ties=False, device=DEV):
    g = torch.Generator().manual_seed(seed)
    nq, nkv = math.ceil(L / bq), math.ceil(S / bk)
    logits = torch.randn(B, H, nq, nkv, generator=g)
    if ties:  # few distinct values: the order among equal scores decides
        logits = logits.round()
    return pooled_scores_softmax(logits, L, S, bq, bk, causal).to(device)


def pooled_scores_softmax(logits, L, S, bq, bk, causal):
    from sparsec.layouts.block_layout import block_geometry

    valid, _ = block_geometry(L, S, bq, bk, causal)
    return torch.softmax(logits.masked_fill(~valid, float("-inf")), -1)


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("case", SELECT_CASES, ids=lambda c: "-".join(map(str, c)))
def test_select_blocks_identical_to_reference(case, ties):
    L, S, bq, bk, causal, topk, thr, sink, window = case
    scores = _scores(2, 1, L, S, bq, bk, causal, seed=L + S + topk, ties=ties)
    with poisoned():
        got = K.select_blocks(scores, L, S, causal, bq, bk, topk, thr, sink, window)
    want = select_from_scores(scores.cpu(), L, S, bq, bk, causal, topk, thr, sink, window)
    for name, a, b in zip(("num", "idx", "full_num", "full_idx"), got, want):
        assert a.dtype == torch.int32 and a.shape == b.shape, name
        assert torch.equal(a.cpu(), b), name


def test_scores_then_selection_is_a_valid_layout():
    from sparsec.layouts import BlockLayout

    q, k = qk(1, 2, 1, 90, 90, 16, torch.float32, seed=4)
    probs = K.block_scores(q, k, 0.25, True, 16, 16)
    lay = BlockLayout(*K.select_blocks(probs, 90, 90, True, 16, 16, 2, 0.0, 16, 16),
                      90, 90, 16, 16, True)
    lay.to("cpu").validate()


# GPU ----------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_selection_matches_and_never_syncs():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    q, k = qk(2, 8, 2, 4000, 4000, 128, torch.bfloat16, seed=1, device="cuda")
    probs = K.block_scores(q, k, 1 / math.sqrt(128), True, 64, 64)
    want = pooled_block_scores(q.double(), k.double(), 1 / math.sqrt(128), True, 64, 64)
    assert rel_err(probs, want) < 1e-5
    for topk, thr in ((8, 0.0), (0, 0.9), (16, 0.5)):
        got = K.select_blocks(probs, 4000, 4000, True, 64, 64, topk, thr, 64, 256)
        ref = select_from_scores(probs, 4000, 4000, 64, 64, True, topk, thr, 64, 256)
        assert all(torch.equal(a, b) for a, b in zip(got, ref)), (topk, thr)
    from sparsec.ops.block_select import block_scores_op, select_blocks_op

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        p = block_scores_op(q, k, 0.1, True, 64, 64)
        select_blocks_op(p, 4000, 4000, True, 64, 64, 8, 0.9, 64, 256)
    finally:
        torch.cuda.set_sync_debug_mode("default")

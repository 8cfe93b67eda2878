"""Sampled dense–dense product (sparse-delta weight gradient) against a float64 reference.

CPU: Triton's interpreter at small sizes (including chunks whose rows span several windows and
windows holding more entries than one chunk);
GPU (`-m gpu`): real sizes, both paths of `sampled_grad`, the automatic choice, and the op's
CUDA registration."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from sparsec.kernels import sparse_delta as K  # noqa: E402
from sparsec.testing.kernels import TOL, kernel_device, rel_err  # noqa: E402

DEV = kernel_device()


def make(T, out_f, in_f, density, dtype, seed, device=DEV, batch=None):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, T // batch) if batch else (T,)
    grad = torch.randn(*shape, out_f, generator=g).to(device, dtype)
    x = torch.randn(*shape, in_f, generator=g).to(device, dtype)
    k = max(1, int(density * out_f * in_f))
    idx = torch.randperm(out_f * in_f, generator=g)[:k].sort().values.to(device)
    return grad, x, idx


def reference(grad, x, idx, in_f):
    return K.sampled_grad_ref(grad.double().cpu(), x.double().cpu(), idx.cpu(), in_f)


CASES = {  # T, out, in, density, dtype, entries, window, batch
    "fp32-defaults": (100, 64, 48, 0.05, torch.float32, None, None, None),
    "bf16-many-windows": (37, 200, 30, 0.01, torch.bfloat16, 16, 16, None),
    "fp16-dense-ish-batched": (70, 96, 96, 0.3, torch.float16, None, None, 2),
    "one-entry": (16, 16, 16, 0.0, torch.float32, None, None, None),
    "windows-over-full": (50, 130, 20, 0.5, torch.float32, 32, 16, None),
}


@pytest.mark.parametrize("form", ["window", "block"])
@pytest.mark.parametrize("name", CASES)
def test_sampled_kernel_matches_reference(name, form):
    T, out_f, in_f, density, dtype, entries, window, batch = CASES[name]
    grad, x, idx = make(T, out_f, in_f, density, dtype, seed=len(name), batch=batch)
    got = K.sampled_grad_sampled(grad, x, idx, in_f, entries=entries, window=window,
                                 tokens=32, form=form)
    assert got.dtype == dtype and got.shape == idx.shape
    assert rel_err(got.cpu(), reference(grad, x, idx, in_f)) < TOL[dtype]


@pytest.mark.parametrize("order", K.ORDERS)
def test_every_order_of_transpose_and_products(order):
    """The transpose's grid order and the products' token direction (ragged last token
    tile, token ranges, both forms) do not change the sums."""
    grad, x, idx = make(100, 40, 24, 0.2, torch.float32, seed=3)
    for form in ("block", "window"):
        for splits in (1, 3):
            got = K.sampled_grad_sampled(grad, x, idx, 24, entries=16, window=16, tokens=16,
                                         splits=splits, form=form, order=order)
            assert rel_err(got.cpu(), reference(grad, x, idx, 24)) < TOL[torch.float32]


@pytest.mark.parametrize("T,k", [(0, 5), (9, 0)])
def test_no_tokens_or_no_entries(T, k):
    grad, x = torch.randn(T, 16).to(DEV), torch.randn(T, 8).to(DEV)
    idx = torch.arange(k, device=DEV) * 3
    got = K.sampled_grad_sampled(grad, x, idx, 8)
    assert got.shape == (k,) and not got.any()


@pytest.mark.parametrize("splits", [2, 3, 7])
def test_token_splits_sum_to_the_whole(splits):
    """Token ranges (ragged last one, more ranges than token tiles) summed by the reduce
    kernel, in bfloat16 and float32, both forms."""
    for dtype in (torch.float32, torch.bfloat16):
        grad, x, idx = make(100, 40, 24, 0.2, dtype, seed=splits)
        for form in ("block", "window"):
            got = K.sampled_grad_sampled(grad, x, idx, 24, entries=16, window=16, tokens=16,
                                         splits=splits, form=form)
            assert got.dtype == dtype
            assert rel_err(got.cpu(), reference(grad, x, idx, 24)) < TOL[dtype]


def test_token_splits_fill_the_gpu_but_keep_ranges_long():
    dev = torch.device("cpu")  # 8 "SMs" off the GPU
    assert K.token_splits(2, 8192, dev) == 4  # few chunks: about one program per SM
    assert K.token_splits(1, 8192, dev) == 8
    assert K.token_splits(1, 8192, dev, tokens=512) == 2  # ranges stay 8 tiles long
    assert K.token_splits(5, 8192, dev) == 1  # enough chunks already
    assert K.token_splits(2, 300, dev) == 1  # too few tokens to split


def test_block_form_takes_unsorted_indices():
    grad, x, idx = make(40, 50, 40, 0.05, torch.float32, seed=2)
    idx = idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(0))]
    got = K.sampled_grad_sampled(grad, x, idx, 40, entries=16, window=16, tokens=32,
                                 form="block")
    assert rel_err(got.cpu(), reference(grad, x, idx, 40)) < TOL[torch.float32]


@pytest.mark.parametrize("tile", [None, (32, 64, 4), (64, 16, 2)])
def test_transpose_kernel(tile):
    x = torch.randn(70, 130).to(DEV)
    assert torch.equal(K.transpose(x[:, 1:], tile).cpu(), x[:, 1:].t().cpu())


def test_sampled_must_win_by_median_and_fastest_run():
    steady = {"sampled": [0.46] * 7, "dense": [0.34] * 7}
    assert not K._sampled_wins(steady)
    burst = {"sampled": [0.46] * 7, "dense": [0.34, 0.34, 1.0, 1.0, 1.0, 1.0, 0.34]}
    assert not K._sampled_wins(burst)  # dense's median moved, its fastest run did not
    assert K._sampled_wins({"sampled": [0.12] * 7, "dense": [0.37] * 7})


def test_form_is_window_for_sorted_indices():
    assert K.choose_form() == "window"
    assert K.choose_form(sorted_indices=False) == "block"


def test_window_tiles_fit_the_expected_entries():
    assert K.window_tiles(int(1e-3 * 4096 * 4096), 4096) == (128, 16)   # ~66 per window
    assert K.window_tiles(int(1e-4 * 4096 * 4096), 4096) == (128, 128)  # ~52 per window
    assert K.window_tiles(int(3e-3 * 4096 * 4096), 4096) == (256, 16)   # ~197: two chunks' worth
    assert K.window_tiles(1, 4096) == (32, 128)


def test_row_bounds_from_the_transpose_kernel():
    idx = torch.tensor([0, 5, 17, 40, 41, 99]).to(DEV)  # a 10 x 10 matrix, windows of 2 rows
    assert K.row_bounds(idx, 10, 2, 10).tolist() == [0, 3, 3, 5, 5, 6]  # rows 0 0 1 4 4 9
    assert K.row_bounds(idx, 10, 4, 11).tolist() == [0, 5, 5, 6]  # rows 0 0 1 3 3 9, ragged
    assert K.row_bounds(idx[:0], 10, 2, 10).tolist() == [0] * 6  # no entries


@pytest.mark.parametrize("k,rows,window", [(1, 7, 16), (300, 1000, 2), (5000, 600, 1)])
def test_row_bounds_match_searchsorted(k, rows, window):
    """More windows than one bounds program holds, entries past a power of two, windows of
    one row: the kernel's binary search against torch.searchsorted."""
    g = torch.Generator().manual_seed(k)
    idx = torch.randperm(rows * 50, generator=g)[:k].sort().values
    starts = torch.arange(-(-rows // window) + 1) * (window * 50)
    want = torch.searchsorted(idx, starts, out_int32=True)
    assert torch.equal(K.row_bounds(idx.to(DEV), rows, window, 50).cpu(), want)


def test_dense_path_and_choice_agree_with_reference(monkeypatch):
    grad, x, idx = make(48, 64, 32, 0.1, torch.float32, seed=5)
    want = reference(grad, x, idx, 32)
    assert rel_err(K.sampled_grad_dense(grad, x, idx, 32).cpu(), want) < 1e-5
    for forced in ("sampled", "dense"):
        monkeypatch.setenv("SPARSEC_SAMPLED_GRAD", forced)
        assert K.choose_method(grad, x, idx, 32) == forced
        assert rel_err(K.sampled_grad(grad, x, idx, 32).cpu(), want) < 1e-5


def test_cost_model_prefers_sampled_only_when_sparse():
    assert K._model(8192, 4096, 4096, int(1e-3 * 4096 * 4096), 2) == "sampled"
    assert K._model(8192, 4096, 4096, int(5e-2 * 4096 * 4096), 2) == "dense"


# GPU ----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("density", [1e-3, 1e-2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_both_paths_match_reference(dtype, density, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    grad, x, idx = make(2048, 1024, 768, density, dtype, seed=1, device="cuda", batch=2)
    want = reference(grad, x, idx, 768)
    assert rel_err(K.sampled_grad_sampled(grad, x, idx, 768).cpu(), want) < TOL[dtype]
    assert rel_err(K.sampled_grad_dense(grad, x, idx, 768).float().cpu(), want) < \
        max(TOL[dtype], 1e-3)  # fp32 dense may run on tf32 where a user enabled it
    monkeypatch.delenv("SPARSEC_SAMPLED_GRAD", raising=False)
    assert K.choose_method(grad, x, idx, 768) in ("sampled", "dense")
    assert rel_err(K.sampled_grad(grad, x, idx, 768).float().cpu(), want) < max(TOL[dtype],
                                                                                1e-3)


@pytest.mark.gpu
def test_gpu_op_uses_the_kernel(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    used = []
    real = K.sampled_grad
    monkeypatch.setattr(K, "sampled_grad", lambda *a: used.append(1) or real(*a))
    grad, x, idx = make(512, 256, 128, 0.01, torch.bfloat16, seed=3, device="cuda")
    got = torch.ops.sparsec.sampled_grad(grad, x, idx, 128)
    assert used and rel_err(got.cpu(), reference(grad, x, idx, 128)) < TOL[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_structured_grad_forms_no_dense_weight_gradient():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    structured = pytest.importorskip("sparsec.ops.structured")
    g = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    index = torch.arange(0, 4096, 64, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = structured.structured_grad(g, x, index, 0)
    peak = torch.cuda.max_memory_allocated() - base
    assert out.shape == (64, 4096)
    assert peak < 4096 * 4096 * 2 // 2  # well under one dense bf16 dW


@pytest.mark.gpu
@pytest.mark.parametrize("density", [1e-4, 1e-3])
def test_gpu_repeated_calls_replay_a_stored_launch(density):
    """The second call of a shape replays stored launches (no Triton JIT) on new tensors and
    gives the same bits as a first call through Triton would."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    K._PLANS.clear()
    grad, x, idx = make(4096, 1024, 512, density, torch.bfloat16, seed=4, device="cuda")
    first = K.sampled_grad_sampled(grad, x, idx, 512)
    assert K._PLANS, "no launch was stored"
    grad2, x2, idx2 = (t.clone() for t in (grad, x, idx))
    again = K.sampled_grad_sampled(grad2, x2, idx2, 512)  # replayed, other storage
    assert torch.equal(first, again)
    assert rel_err(again.cpu(), reference(grad, x, idx, 512)) < TOL[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_stored_launches_tell_weights_apart():
    """Two weights that share tokens, in_features, entry count and tiles but not out_features
    (so not the number of row windows): the second call must not replay the first one's
    transpose with its row bounds."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    K._PLANS.clear()
    for out_f in (1024, 2048, 1024):
        g = torch.Generator().manual_seed(out_f)
        grad = torch.randn(512, out_f, generator=g).to("cuda", torch.bfloat16)
        x = torch.randn(512, 256, generator=g).to("cuda", torch.bfloat16)
        idx = torch.randperm(out_f * 256, generator=g)[:3000].sort().values.to("cuda")
        got = K.sampled_grad_sampled(grad, x, idx, 256, form="window", entries=128, window=16)
        assert rel_err(got.cpu(), reference(grad, x, idx, 256)) < TOL[torch.bfloat16]


def test_forget_choices_drops_every_cached_choice(monkeypatch):
    monkeypatch.delenv("SPARSEC_SAMPLED_GRAD", raising=False)
    K._DECISIONS[("key",)] = K._SEEN[("exact",)] = "dense"
    K.forget_choices()
    assert not K._DECISIONS and not K._SEEN

"""Sparse-delta products on a GPU: the sampled weight gradient against dense dW + gather, and the
forward variants of y = x (W + Δ)ᵀ, in one run.

    python tools/bench_sparse_delta.py                  # 4096 x 4096 weight, 8192 tokens, bf16
    python tools/bench_sparse_delta.py --quick          # 0.1% and 1% only

Gradient: `sampled` (sparsec's Triton kernel, v5: x transposed once, then either chunks of
64 sorted entries or one program per aligned row window of W, picked by the entries per row),
`other` (the same kernel in the form not picked: checks the pick; earlier versions' times are
in the earlier result files),
`dense` (gradᵀ·x through cuBLAS, then a gather), `auto` (what `sampled_grad` runs: sampled
where its median, measured on the first call, is 10% under dense; cached; the choice is made
three times afresh per density and `stable` says how often it agreed) at 0.1% and 1%
density and over a sweep; the crossover density (where dense starts to win) is
interpolated from the sweep. Forward:
`materialize` (W + Δ into a new dense weight, then one GEMM: the op's path), `dense only`
(x·Wᵀ: the lower bound), `dense + cuSPARSE` (x·Wᵀ plus Δ·xᵀ as a CSR product).
Every variant is checked against a float64 reference on sampled entries before it is timed;
times are medians of `triton.testing.do_bench`, rotating between two input sets. Prints
tables; with $OUT set (or --json) writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsec.kernels import sparse_delta as K  # noqa: E402


def other_form() -> dict:
    """The sampled path's arguments for the form `choose_form` does not pick."""
    return {"form": "block" if K.choose_form() == "window" else "window"}


# variants tried at 0.1% and 0.01% for the next round's defaults
SWEEP_VARIANTS = {
    "block": {"form": "block"}, "window": {"form": "window"},
    "block,warps=4": {"form": "block", "warps": 4},
    "block,pipeline=3": {"form": "block", "pipeline": 3},
    "window,entries=64": {"form": "window", "entries": 64}}
SWEEP = (1e-4, 3e-4, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2e-2, 5e-2)


def fail(msg: str) -> None:
    print(f"bench_sparse_delta: {msg}", file=sys.stderr)
    sys.exit(2)


def bench(fn, sets, rep=100) -> float:
    import triton.testing

    state = {"i": 0}

    def step():
        fn(sets[state["i"] % len(sets)])
        state["i"] += 1
    return float(triton.testing.do_bench(step, warmup=25, rep=rep, return_mode="median"))


def indices(out_f, in_f, density, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    k = max(1, int(round(density * out_f * in_f)))
    return torch.randperm(out_f * in_f, device="cuda", generator=g)[:k].sort().values


def check_grad(name, got, grad, x, idx, in_f, tol=2e-2):
    """Against float64 on up to 4096 sampled entries."""
    pick = torch.randperm(idx.numel(), device=idx.device)[:4096]
    sub = idx[pick]
    want = (grad.double()[:, sub // in_f] * x.double()[:, sub % in_f]).sum(0)
    err = float((got[pick].double() - want).norm() / want.norm())
    if not err < tol:
        raise AssertionError(f"{name}: relative error {err:.3g} >= {tol}")
    return err


def grad_rows(args, sets):
    out_f, in_f = args.out_features, args.in_features
    rows = []
    densities = (1e-3, 1e-2) if args.quick else sorted(set(SWEEP) | {1e-3, 1e-2})
    for d in densities:
        idx = indices(out_f, in_f, d, seed=int(d * 1e6))
        g0, x0 = sets[0]
        other = other_form()
        errs = {"sampled": check_grad("sampled", K.sampled_grad_sampled(g0, x0, idx, in_f), g0,
                                      x0, idx, in_f),
                "sampled_other": check_grad("sampled, other form", K.sampled_grad_sampled(
                    g0, x0, idx, in_f, **other), g0, x0, idx, in_f),
                "dense": check_grad("dense", K.sampled_grad_dense(g0, x0, idx, in_f), g0, x0,
                                    idx, in_f)}
        # the automatic choice, made afresh three times (as three processes would): a robust
        # choice gives the same answer each time
        choices = []
        for _ in range(3):
            K.forget_choices()
            choices.append(K.choose_method(g0, x0, idx, in_f))
        choice = choices[-1]  # cached: what sampled_grad runs below
        row = {"density": d, "k": idx.numel(), "auto_choice": choice, "choices": choices,
               "errors": errs, "form": K.choose_form(),
               "tiles": (K.window_tiles if K.choose_form() == "window"
                         else K.tiles)(idx.numel(), out_f),
               "sampled_ms": bench(lambda s: K.sampled_grad_sampled(s[0], s[1], idx, in_f),
                                   sets),
               "sampled_other_ms": bench(lambda s: K.sampled_grad_sampled(
                   s[0], s[1], idx, in_f, **other), sets),
               "auto_ms": bench(lambda s: K.sampled_grad(s[0], s[1], idx, in_f), sets),
               # right after auto, at every density: compared with one dense time taken at
               # the start, the later rows saw a warmer, slower GPU (auto at 1%, which runs
               # this same dense path, measured 1.05-1.06x of it)
               "dense_ms": bench(lambda s: K.sampled_grad_dense(s[0], s[1], idx, in_f), sets)}
        dense_ms = row["dense_ms"]
        rows.append(row)
        print(f"  density {d:.2%}: sampled {row['sampled_ms']:.3f} ms ({row['form']} form, "
              f"entries, rows {row['tiles']}), other form {row['sampled_other_ms']:.3f} ms, "
              f"dense {dense_ms:.3f} ms, auto "
              f"({choice}; choices {choices}) {row['auto_ms']:.3f} ms", flush=True)
    transpose_ms = bench(lambda s: K.transpose(s[1]), sets)
    for d in (1e-3, 1e-4):
        next(r for r in rows if r["density"] == d)["tile_sweep"] = tile_sweep(in_f, sets, d)
    return rows, transpose_ms


def tile_sweep(in_f, sets, density) -> dict:
    """Median ms of the sampled path with other forms and tiles, each checked first;
    a failing variant is reported, not fatal (the tables are the results)."""
    idx = indices(sets[0][0].shape[1], in_f, density, seed=1000)
    g0, x0 = sets[0]
    sweep = {}
    for name, kw in SWEEP_VARIANTS.items():
        def fn(s, kw=kw):
            return K.sampled_grad_sampled(s[0], s[1], idx, in_f, **kw)
        try:
            check_grad(f"sampled {name}", fn(sets[0]), g0, x0, idx, in_f)
            sweep[name] = bench(fn, sets)
        except Exception as e:  # noqa: BLE001
            print(f"  sampled {name} FAILED: {e}", flush=True)
    print(f"  sampled variants at {density:.2%}: "
          + ", ".join(f"{k} {v:.3f} ms" for k, v in sweep.items()), flush=True)
    return sweep


def crossover(rows) -> float | None:
    """The density (log-interpolated) where sampled stops beating dense; None if it never
    does or always does within the sweep."""
    for a, b in zip(rows, rows[1:]):
        ra, rb = a["sampled_ms"] / a["dense_ms"], b["sampled_ms"] / b["dense_ms"]
        if ra <= 1 < rb:
            t = (0 - math.log(ra)) / (math.log(rb) - math.log(ra))
            return math.exp(math.log(a["density"]) + t * (math.log(b["density"]) -
                                                          math.log(a["density"])))
    return None


def forward_rows(args, dtype):
    out_f, in_f, T = args.out_features, args.in_features, args.tokens
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(out_f, in_f, device="cuda", dtype=dtype, generator=gen) * 0.02
    sets = [(torch.randn(T, in_f, device="cuda", dtype=dtype, generator=gen),) for _ in range(2)]
    rows = []
    for d in ((1e-3, 1e-2) if args.quick else (1e-3, 1e-2, 5e-2)):
        idx = indices(out_f, in_f, d, seed=7)
        vals = torch.randn(idx.numel(), device="cuda", dtype=dtype, generator=gen) * 0.01
        merged = w.double().reshape(-1).index_add(0, idx, vals.double()).view(out_f, in_f)
        ref = F.linear(sets[0][0].double(), merged)
        row = {"density": d}

        def materialize(s):
            return K.sparse_delta_ref(s[0], w, None, idx, vals)
        variants = {"materialize": materialize,
                    "dense only": lambda s: F.linear(s[0], w)}
        try:
            delta = torch.sparse_coo_tensor(torch.stack([idx // in_f, idx % in_f]), vals,
                                            (out_f, in_f)).coalesce().to_sparse_csr()

            def cusparse(s):
                return F.linear(s[0], w) + torch.sparse.mm(delta, s[0].t()).t()
            cusparse(sets[0])
            variants["dense + cuSPARSE"] = cusparse
        except (RuntimeError, NotImplementedError) as e:  # bf16 CSR products are not everywhere
            row["dense + cuSPARSE"] = f"unsupported: {str(e).splitlines()[0][:80]}"
        for name, fn in variants.items():
            if name != "dense only":
                err = float((fn(sets[0]).double() - ref).norm() / ref.norm())
                if not err < 2e-2:
                    raise AssertionError(f"forward {name}: relative error {err:.3g}")
            row[name] = bench(fn, sets)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-features", type=int, default=4096)
    p.add_argument("--in-features", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        fail("needs a CUDA GPU (torch.cuda.is_available() is False)")
    if not K.HAS_TRITON:
        fail("triton is not installed")
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device="cuda").manual_seed(1)
    sets = [(torch.randn(args.tokens, args.out_features, device="cuda", dtype=dtype,
                         generator=gen),
             torch.randn(args.tokens, args.in_features, device="cuda", dtype=dtype,
                         generator=gen)) for _ in range(2)]
    print("gradient (sampled_grad):", flush=True)
    rows, transpose_ms = grad_rows(args, sets)
    cross = crossover(rows)
    print("forward (y = x (W + Δ)ᵀ):", flush=True)
    fwd = forward_rows(args, dtype)
    T, o, i = args.tokens, args.out_features, args.in_features
    floors = {"dense_dW_ms": 2 * T * o * i / 800e12 * 1e3,
              "sampled_read_once_ms": T * (o + i) * dtype.itemsize / 3e12 * 1e3,
              "gemm_ms": 2 * T * o * i / 800e12 * 1e3}
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "tokens": T, "out_features": o,
              "in_features": i, "dtype": args.dtype, "grad": rows, "transpose_ms": transpose_ms,
              "crossover_density": cross, "forward": fwd, "floors": floors}
    path = args.json or (os.path.join(os.environ["OUT"], "bench_sparse_delta.json")
                         if os.environ.get("OUT") else None)
    if path:
        Path(path).write_text(json.dumps(result, indent=1))
    print(f"\n{result['device']}, torch {result['torch']}, triton {result['triton']}: weight "
          f"{o}x{i}, {T} tokens, {args.dtype}; median ms (do_bench)")
    print(f"{'density':>8} {'k':>9} | {'sampled':>8} {'other':>8} {'dense+g':>8} "
          f"{'auto':>8} "
          f"{'choice':>8} {'stable':>6} | {'dense/sampled':>13} {'auto/dense':>10}")
    for r in rows:
        stable = f"{r['choices'].count(r['auto_choice'])}/{len(r['choices'])}"
        print(f"{r['density']:8.2%} {r['k']:9d} | {r['sampled_ms']:8.3f} "
              f"{r['sampled_other_ms']:8.3f} {r['dense_ms']:8.3f} "
              f"{r['auto_ms']:8.3f} "
              f"{r['auto_choice']:>8} {stable:>6} | "
              f"{r['dense_ms'] / r['sampled_ms']:12.2f}x {r['auto_ms'] / r['dense_ms']:9.2f}x")
    for r in rows:
        if "tile_sweep" in r:
            print(f"sampled variants at {r['density']:.2%}: "
                  + ", ".join(f"{k} {v:.3f} ms" for k, v in r["tile_sweep"].items()))
    print(f"crossover (sampled stops winning): "
          f"{'%.3f%%' % (100 * cross) if cross else 'outside the sweep'}; transpose of x "
          f"{transpose_ms:.3f} ms; floors: dense dW {floors['dense_dW_ms']:.3f} ms, sampled "
          f"(read grad and x once) {floors['sampled_read_once_ms']:.3f} ms")
    names = ["materialize", "dense only", "dense + cuSPARSE"]
    print(f"\n{'density':>8} | " + " ".join(f"{n:>16}" for n in names))
    for r in fwd:
        cells = [f"{r[n]:16.3f}" if isinstance(r.get(n), float) else f"{'n/a':>16}"
                 for n in names]
        print(f"{r['density']:8.2%} | " + " ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())

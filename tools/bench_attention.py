"""Block-sparse attention on a GPU: dense causal SDPA (flash), FlexAttention on the same block
masks, and sparsec's Triton kernels, in one run.

    python tools/bench_attention.py                   # batch 1, 32 heads, head dim 128, bf16
    python tools/bench_attention.py --lengths 4096 --no-flex --quick

Layouts (blocks of 128, causal): random layouts at 16% of the causal grid (L=4k) and 11%
(16k, 32k), each head its own draw with the diagonal kept; sliding window + sink at 16k and
32k; and the dense causal layout at 4k (sparsec at 100% density against flash: the per-block
efficiency). Every configuration is checked before it is timed: sparsec against FlexAttention
(output and gradients) and against a float32 row oracle on sampled rows (dense layout: against
SDPA). Times are medians of `triton.testing.do_bench` (device events), rotating between input
sets so no run reads another's inputs from L2. Prints a table of milliseconds and speedups
(sparsec = v2), then the variants side by side with the host time to issue one call; with
$OUT set (or --json) writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sparsec  # noqa: E402
from sparsec.kernels._triton import settings  # noqa: E402
from sparsec.layouts import BlockLayout, sliding_window  # noqa: E402

BLOCK = 128

# sparsec variants one run compares (sparsec.kernels._triton.Settings): v1 is the first
# version (every launch through Triton's JIT and autotuner, eager calls through the custom op,
# the split backward); v2 the current default
VARIANTS = {
    "v1": dict(launch="triton", eager="op", attn_bwd="split"),
    "v2": dict(launch="direct", eager="function", attn_bwd="auto"),
    "v2-split": dict(launch="direct", eager="function", attn_bwd="split"),
    "v2-atomic": dict(launch="direct", eager="function", attn_bwd="atomic"),
}
FWD_VARIANTS = ("v1", "v2")
MAIN = "v2"


def fail(msg: str) -> None:
    print(f"bench_attention: {msg}", file=sys.stderr)
    sys.exit(2)


# layouts ----------------------------------------------------------------------------------
def random_causal_layout(L: int, heads: int, density: float, seed: int) -> BlockLayout:
    """Per head: the diagonal plus a uniform draw of below-diagonal blocks, so that exactly
    round(density × causal blocks) blocks are kept."""
    n = L // BLOCK
    g = torch.Generator().manual_seed(seed)
    total = n * (n + 1) // 2
    extra = max(0, round(density * total) - n)
    rows, cols = torch.tril_indices(n, n, offset=-1)
    keep = torch.zeros(1, heads, n, n, dtype=torch.bool)
    keep[0, :, torch.arange(n), torch.arange(n)] = True
    for h in range(heads):
        pick = torch.randperm(rows.numel(), generator=g)[:extra]
        keep[0, h, rows[pick], cols[pick]] = True
    return BlockLayout.from_dense_blocks(keep, L, L, BLOCK, BLOCK, True)


def configs(args) -> list[tuple[str, int, BlockLayout]]:
    out = []
    for L in args.lengths:
        dens = 0.16 if L <= 4096 else 0.11
        out.append((f"random {dens:.0%}", L, random_causal_layout(L, args.heads, dens, L)))
    for L in args.lengths:
        if L >= 16384:
            win = L // 16
            out.append((f"window {win // 1024}k+sink 128", L,
                        sliding_window(L, window=win, sink=BLOCK, block=BLOCK)))
    if not args.quick:
        L = min(args.lengths)
        out.append(("dense causal", L, sparsec.layouts.dense(L, block=BLOCK, causal=True)))
    return out


def flex_block_mask(layout: BlockLayout, L: int, heads: int):
    """FlexAttention's BlockMask from the same four tensors, broadcast to every head and padded
    to the full grid width, so that every layout of a length shares one compiled Flex kernel;
    partial blocks apply the causal mask_mod, full blocks none — the same split sparsec's
    kernels make. (Only the compiled Flex kernels read the block structure; Flex's eager
    fallback applies mask_mod densely, so it would compute plain causal attention: always call
    the compiled one.)"""
    from torch.nn.attention.flex_attention import BlockMask

    n = layout.num_kv_blocks

    def full(t, pad=False):
        t = t.expand(1, heads, *t.shape[2:])
        return (F.pad(t, (0, n - t.shape[-1])) if pad else t).contiguous()

    num, idx, fnum, fidx = layout.tensors()
    args = (full(num), full(idx, True), full(fnum), full(fidx, True))
    kwargs = dict(BLOCK_SIZE=BLOCK, mask_mod=lambda b, h, q, kv: q >= kv)
    try:
        return BlockMask.from_kv_blocks(*args, **kwargs, seq_lengths=(L, L))
    except TypeError:  # torch versions without seq_lengths: L is a multiple of BLOCK anyway
        return BlockMask.from_kv_blocks(*args, **kwargs)


# checks -----------------------------------------------------------------------------------
def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def row_oracle(q, k, v, layout: BlockLayout, rows: torch.Tensor, head: int) -> torch.Tensor:
    """float32 attention of the sampled query rows of one head under the layout."""
    allowed = layout.to_dense_blocks()[0, min(head, layout.heads - 1)]  # [NQ, NKV]
    keys = torch.arange(q.shape[2], device=q.device)
    mask = allowed[rows // BLOCK][:, keys // BLOCK] & (keys[None, :] <= rows[:, None])
    s = (q[0, head, rows].float() @ k[0, head].float().T) / math.sqrt(q.shape[-1])
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    return p @ v[0, head].float()


def check(name, q, k, v, layout, flex, bm, variants, tol=2e-2) -> dict:
    """Errors of every sparsec variant against Flex (out, dq, dk, dv) and of the forward
    against the row oracle; raises on failure."""
    do = torch.randn_like(q)
    errs = {}
    ref = None
    if flex is not None:
        q2, k2, v2 = (x.detach().clone().requires_grad_() for x in (q, k, v))
        out2 = flex(q2, k2, v2, block_mask=bm)
        out2.backward(do)
        ref = (out2.detach(), q2.grad, k2.grad, v2.grad)
    for variant in variants:
        with settings(**VARIANTS[variant]):
            x = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            out = sparsec.block_sparse_attention(*x, layout)
            out.backward(do)
        mine = (out.detach(), *(t.grad for t in x))
        if ref is not None:
            for key, a, b in zip(("out", "dq", "dk", "dv"), mine, ref):
                errs[f"{variant}:{key}_vs_flex"] = rel(a, b)
    L = q.shape[2]
    g = torch.Generator(device=q.device).manual_seed(0)
    rows = torch.cat([torch.randint(0, L, (48,), device=q.device, generator=g),
                      torch.arange(L - 16, L, device=q.device)])
    for head in (0, q.shape[1] - 1):
        errs[f"rows_h{head}"] = rel(mine[0][0, head, rows], row_oracle(q, k, v, layout, rows,
                                                                         head))
    if name.startswith("dense"):
        with torch.no_grad():
            errs["out_vs_sdpa"] = rel(mine[0], F.scaled_dot_product_attention(q, k, v,
                                                                              is_causal=True))
    bad = {k_: e for k_, e in errs.items() if not e < tol}
    if bad:
        raise AssertionError(f"{name}: sparsec disagrees: " +
                             ", ".join(f"{k_}={e:.3g}" for k_, e in bad.items()))
    return errs


# timing -----------------------------------------------------------------------------------
def bench(fn_of_set, sets, grads=None, rep=200) -> float:
    import triton.testing

    state = {"i": 0}

    def step():
        fn_of_set(sets[state["i"] % len(sets)])
        state["i"] += 1
    return float(triton.testing.do_bench(step, warmup=25, rep=rep, grad_to_none=grads,
                                         return_mode="median"))


def host_us(fn, sets, reps=30) -> float:
    """Median host microseconds to issue one call, the device queue drained before each."""
    times = []
    for i in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(sets[i % len(sets)])
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2] * 1e6


def time_all(name, L, layout, flex, bm, sets, args, dense_cache) -> dict:
    row = {"config": name, "L": L, "density": layout.density(),
           "kept_blocks_per_head": float(layout.kept_blocks().double().mean())}
    grads = [t for s in sets for t in s[:3]]

    def sparsec_fwd(s):
        sparsec.block_sparse_attention(s[0], s[1], s[2], layout)

    def sparsec_fb(s):
        sparsec.block_sparse_attention(s[0], s[1], s[2], layout).backward(s[3])
        for t in s[:3]:  # as do_bench's grad_to_none: no accumulation kernels
            t.grad = None

    def flex_fwd(s):
        flex(s[0], s[1], s[2], block_mask=bm)

    def flex_fb(s):
        flex(s[0], s[1], s[2], block_mask=bm).backward(s[3])

    def sdpa_fwd(s):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(s[0], s[1], s[2], is_causal=True)

    def sdpa_fb(s):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(s[0], s[1], s[2], is_causal=True).backward(s[3])

    # forward times are taken with inputs that require grad (the autograd graph is recorded,
    # no backward runs): the same compiled Flex graph then serves both modes
    if L not in dense_cache:
        dense_cache[L] = (bench(sdpa_fwd, sets, rep=args.rep),
                          bench(sdpa_fb, sets, grads, rep=args.rep))
    row["sdpa_fwd"], row["sdpa_fwdbwd"] = dense_cache[L]
    for variant in args.variants:
        with settings(**VARIANTS[variant]):
            if variant in FWD_VARIANTS:  # the others differ from v2 only in the backward
                row[f"{variant}_fwd"] = bench(sparsec_fwd, sets, rep=args.rep)
                row[f"{variant}_host_fwd_us"] = host_us(sparsec_fwd, sets)
                row[f"{variant}_host_fwdbwd_us"] = host_us(sparsec_fb, sets)
            row[f"{variant}_fwdbwd"] = bench(sparsec_fb, sets, grads, rep=args.rep)
    main = MAIN if MAIN in args.variants else args.variants[0]
    row["sparsec_fwd"], row["sparsec_fwdbwd"] = row[f"{main}_fwd"], row[f"{main}_fwdbwd"]
    row["flex_fwd"] = bench(flex_fwd, sets, rep=args.rep) if flex else None
    row["flex_fwdbwd"] = bench(flex_fb, sets, grads, rep=args.rep) if flex else None
    # the floor: every kept 128x128 block costs 4·128·128·D flops forward (QKᵀ, PV) and
    # 10·128·128·D backward (5 products); bf16 dense at 800 TFLOP/s
    blocks = row["kept_blocks_per_head"] * args.heads
    row["floor_fwd"] = 4 * blocks * BLOCK * BLOCK * args.dim / 800e12 * 1e3
    row["floor_fwdbwd"] = 14 * blocks * BLOCK * BLOCK * args.dim / 800e12 * 1e3
    return row


def inputs(L, args, n_sets):
    sets = []
    for i in range(n_sets):
        g = torch.Generator(device="cuda").manual_seed(100 + i)
        q, k, v, do = (torch.randn(1, args.heads, L, args.dim, device="cuda",
                                   dtype=torch.bfloat16, generator=g) for _ in range(4))
        sets.append((q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do))
    return sets


# output -----------------------------------------------------------------------------------
def table(rows) -> str:
    def ms(x):
        return f"{x:8.3f}" if x is not None else "       -"

    def sp(a, b):
        return f"{a / b:6.2f}x" if a and b else "      -"
    lines = [f"{'config':22} {'L':>6} {'dens':>6} | {'mode':7} {'SDPA ms':>8} {'Flex ms':>8} "
             f"{'sparsec':>8} {'floor':>8} | {'vs SDPA':>7} {'vs Flex':>7} {'Flex/SDPA':>9}"]
    for r in rows:
        for mode in ("fwd", "fwdbwd"):
            s, f, m = r[f"sdpa_{mode}"], r[f"flex_{mode}"], r[f"sparsec_{mode}"]
            lines.append(f"{r['config']:22} {r['L']:>6} {r['density']:6.1%} | {mode:7} {ms(s)} "
                         f"{ms(f)} {ms(m)} {ms(r[f'floor_{mode}'])} | {sp(s, m)} {sp(f, m)} "
                         f"{sp(s, f):>9}")
    return "\n".join(lines)


def variants_table(rows, variants) -> str:
    def ms(x):
        return f"{x:9.3f}" if x is not None else "        -"
    cols = "".join(f" {v:>9}" for v in variants)
    lines = [f"{'config':22} {'L':>6} | {'mode':7}{cols} | {'v1/v2':>6} | "
             f"{'host v1':>8} {'host v2':>8} (µs per call)"]
    for r in rows:
        for mode in ("fwd", "fwdbwd"):
            cells = "".join(f" {ms(r.get(f'{v}_{mode}'))}" for v in variants)
            a, b = r.get(f"v1_{mode}"), r.get(f"v2_{mode}")
            ratio = f"{a / b:5.2f}x" if a and b else "     -"
            hosts = " ".join(f"{r[f'{v}_host_{mode}_us']:8.0f}" if f"{v}_host_{mode}_us" in r
                             else "       -" for v in ("v1", "v2"))
            lines.append(f"{r['config']:22} {r['L']:>6} | {mode:7}{cells} | {ratio} | {hosts}")
    return "\n".join(lines)


def tuned_configs() -> dict:
    from sparsec.kernels import block_sparse_attention as fwd
    from sparsec.kernels import block_sparse_attention_bwd as bwd

    out = {}
    for name, k in (("fwd", getattr(fwd, "_bsa_fwd_tuned", None)),
                    ("dkdv", getattr(bwd, "_dkdv_tuned", None)),
                    ("dkdv_atomic", getattr(bwd, "_dkdv_tuned_atomic", None)),
                    ("dq", getattr(bwd, "_dq_tuned", None))):
        cache = getattr(k, "cache", {}) or {}
        out[name] = {str(key): str(cfg) for key, cfg in cache.items()}
    out["bwd_auto_choice"] = {str(key[0]): v for key, v in getattr(bwd, "_CHOICES", {}).items()}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")],
                   default=[4096, 16384, 32768])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--rep", type=int, default=200, help="do_bench repetition time (ms)")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    p.add_argument("--quick", action="store_true", help="skip the dense-layout row")
    p.add_argument("--json", default=None, help="write results here (default $OUT/...)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"sparsec variants to compare, of {list(VARIANTS)}")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not any(v in FWD_VARIANTS for v in args.variants):
        fail(f"--variants: unknown {unknown} or none of {FWD_VARIANTS} (needed for forward)")
    if not torch.cuda.is_available():
        fail("needs a CUDA GPU (torch.cuda.is_available() is False)")
    from sparsec.ops.block_sparse_attention import kernel_module
    if kernel_module() is None:
        fail("the Triton kernels are not usable here (is triton installed?)")
    if any(L % BLOCK for L in args.lengths):
        fail(f"lengths must be multiples of {BLOCK}")
    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
    started = time.time()
    rows, errors, dense_cache = [], {}, {}
    for name, L, layout in configs(args):
        layout = layout.to("cuda")
        bm = flex_block_mask(layout, L, args.heads) if flex else None
        per_set = 4 * args.heads * L * args.dim * 2
        sets = inputs(L, args, n_sets=max(2, math.ceil(200e6 / per_set)))
        t0 = time.time()
        try:
            errors[f"{name} L={L}"] = check(name, *sets[0][:3], layout, flex, bm,
                                            args.variants)
        except AssertionError as e:
            print(f"FAILED CHECK: {e}", flush=True)
            errors[f"{name} L={L}"] = str(e)
            continue
        row = time_all(name, L, layout, flex, bm, sets, args, dense_cache)
        rows.append(row)
        print(f"[{time.time() - started:6.1f}s] {name} L={L}: checked+timed in "
              f"{time.time() - t0:.1f}s; sparsec fwd {row['sparsec_fwd']:.3f} ms, "
              f"fwd+bwd {row['sparsec_fwdbwd']:.3f} ms", flush=True)
        del sets
        torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "sdpa": "flash (is_causal=True)",
              "batch": 1, "heads": args.heads, "head_dim": args.dim, "dtype": "bfloat16",
              "block": BLOCK, "rows": rows, "checks": errors, "tuned": tuned_configs(),
              "variants": {v: VARIANTS[v] for v in args.variants}}
    path = args.json or (os.path.join(os.environ["OUT"], "bench_attention.json")
                         if os.environ.get("OUT") else None)
    if path:
        Path(path).write_text(json.dumps(result, indent=1))
    print(f"\n{result['device']}, torch {result['torch']}, triton {result['triton']}: "
          f"batch 1, {args.heads} heads, head dim {args.dim}, bf16, causal, blocks of {BLOCK}; "
          "median ms (do_bench); floor = kept-block FLOPs at 800 TFLOP/s; sparsec = "
          f"{MAIN if MAIN in args.variants else args.variants[0]}")
    print(table(rows))
    print(f"\nsparsec variants (median ms; host = µs to issue one call): "
          f"{', '.join(f'{v} = {VARIANTS[v]}' for v in args.variants)}; backward chosen by "
          f"v2 per length: {result['tuned']['bwd_auto_choice']}")
    print(variants_table(rows, args.variants))
    failed = [k for k, v in errors.items() if isinstance(v, str)]
    if failed:
        print(f"\n{len(failed)} configuration(s) FAILED the correctness check: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

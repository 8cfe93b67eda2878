"""Compile sparsec's Triton kernels for a GPU target on a machine without one, and report
registers, spills, shared memory and whether the matrix instructions are Hopper's (HGMMA).

    python tools/kernel_report.py                       # sm_90, the benchmark's shapes
    python tools/kernel_report.py --arch 80 --dtype float16 --head-dim 64 --block 64

Nothing runs: a stand-in driver hands Triton the target, launches become `warmup` compiles
(tensors on the meta device), and `cuobjdump` from Triton's own package reads the cubins.
Every tile candidate of the autotuner is compiled, so spills show up before a GPU run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import MockTensor  # noqa: E402


class _FakeDriver:
    """Just enough of Triton's driver interface for compiling (never launching)."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("meta")

    def get_device_interface(self):
        return torch.cuda

    def is_active(self):
        return True


RESULTS: list[dict] = []


def _mock(x):
    if isinstance(x, torch.Tensor):
        return MockTensor(x.dtype, list(x.shape))
    return x


class _Compile:
    """Stands in for a JITFunction: kernel[grid](...) compiles with warmup and records."""

    def __init__(self, fn, name):
        self.fn, self.name = fn, name

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            meta = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
            compiled = self.fn.warmup(*map(_mock, args), grid=(1,), **{k: _mock(v) for k, v in
                                                                      kwargs.items()})
            RESULTS.append({"kernel": self.name, "meta": meta,
                            "warps": kwargs.get("num_warps"), "stages": kwargs.get("num_stages"),
                            **_resources(compiled)})
        return run


def _resources(compiled) -> dict:
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", str(path)],
                               capture_output=True, text=True).stdout
        sass = subprocess.run([str(tools / "cuobjdump"), "--dump-sass", str(path)],
                              capture_output=True, text=True).stdout
    field = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    ttgir = compiled.asm.get("ttgir", "")
    return {"regs": field.get("REG"), "stack": field.get("STACK"), "local": field.get("LOCAL"),
            "smem": compiled.metadata.shared,
            # loads the software pipeliner turned into asynchronous copies (0: none pipelined)
            "async": len(re.findall(r"async_copy_global_to_local|async_tma_copy", ttgir)),
            "mma": "HGMMA" if "HGMMA" in sass else "HMMA" if "HMMA" in sass else
            "FFMA" if "FFMA" in sass else "-"}


def _attention(args):
    from sparsec.kernels import _attention_common as common
    from sparsec.kernels import block_sparse_attention as fwd
    from sparsec.kernels import block_sparse_attention_bwd as bwd
    from sparsec.layouts import sliding_window

    common.kernel_supports = lambda *a: None
    fwd.kernel_supports = bwd.kernel_supports = common.kernel_supports
    dtype = getattr(torch, args.dtype)
    B, H, L, D = 1, 4, 4 * args.block, args.head_dim
    lay = sliding_window(L, window=2 * args.block, sink=args.block, block=args.block)
    t = lambda *s: torch.empty(*s, dtype=dtype, device="meta")  # noqa: E731
    q, k, v = t(B, H, L, D), t(B, H, L, D), t(B, H, L, D)
    layout = [x.to("meta") for x in lay.tensors()]
    fwd_kernel, dkdv, dq = fwd._bsa_fwd_kernel, bwd._bwd_dkdv_kernel, bwd._bwd_dq_kernel
    fwd._bsa_fwd_kernel = _Compile(fwd_kernel, "attn_fwd")
    bwd._bwd_dkdv_kernel = _Compile(dkdv, "attn_dkdv")
    bwd._bwd_dq_kernel = _Compile(dq, "attn_dq")
    bwd._bwd_preprocess_kernel = _Compile(bwd._bwd_preprocess_kernel, "attn_preprocess")
    bwd._dq_convert_kernel = _Compile(bwd._dq_convert_kernel, "attn_dq_convert")
    blk = args.block
    for cfg in fwd._prune_fwd(fwd.FWD_CONFIGS, {}, BLOCK_Q=blk, BLOCK_KV=blk, BLOCK_D=D,
                              BLOCK_DV=D):
        fwd.block_sparse_attention(q, k, v, *layout, None, 0.1, True, blk, blk, config=cfg)
    prune = dict(BLOCK_Q=blk, BLOCK_KV=blk, BLOCK_D=D, BLOCK_DV=D)
    runs = [("split", c, None, "attn_dkdv") for c in bwd._prune(bwd.DKDV_CONFIGS, {}, **prune)]
    runs += [("split", None, c, "attn_dq") for c in bwd._prune_dq(bwd.DQ_CONFIGS, {}, **prune)]
    runs += [("atomic", c, None, "attn_dkdv_atomic")
             for c in bwd._prune(bwd.ATOMIC_CONFIGS, {}, **prune)]
    for variant, dkdv_cfg, dq_cfg, name in runs:
        saved = len(RESULTS)
        bwd.block_sparse_attention_backward(
            q, q, k, v, q, torch.empty(B, H, L, device="meta"), *layout, None, 0.1, True, blk,
            blk, configs=(dkdv_cfg or bwd.dkdv_config(blk, blk, D),
                          dq_cfg or bwd.dq_config(blk, blk, D)), variant=variant)
        # keep only the kernel this run is about (and the small ones once)
        new = RESULTS[saved:]
        want = "attn_dkdv" if name.startswith("attn_dkdv") else name
        RESULTS[saved:] = [dict(r, kernel=name) for r in new if r["kernel"] == want]
        if variant == "atomic" and dkdv_cfg is bwd._prune(bwd.ATOMIC_CONFIGS, {}, **prune)[0]:
            RESULTS.extend(r for r in new if r["kernel"] in ("attn_preprocess",
                                                             "attn_dq_convert"))


def _selection(args):
    from sparsec.kernels import block_select as sel

    sel._usable = lambda *t: True
    dtype = getattr(torch, args.dtype)
    L = 32768
    q = torch.empty(1, 32, L, args.head_dim, dtype=dtype, device="meta")
    for name in ("_pool_kernel", "_scores_kernel", "_select_kernel"):
        setattr(sel, name, _Compile(getattr(sel, name), name.strip("_").replace("_kernel", "")))
    sel.block_scores(q, q, 0.1, True, args.block, args.block)
    n = L // args.block
    scores = torch.empty(1, 32, n, n, device="meta")
    sel._kinds = lambda *a: torch.empty(n, n, dtype=torch.int8, device="meta")
    sel.select_blocks(scores, L, L, True, args.block, args.block, 8, 0.9, 128, 1024)


def _sparse_delta(args):
    from sparsec.kernels import sparse_delta as sd

    sd._usable = lambda *t: True
    dtype = getattr(torch, args.dtype)
    T, out_f, in_f = 8192, 4096, 4096
    g = torch.empty(T, out_f, dtype=dtype, device="meta")
    x = torch.empty(T, in_f, dtype=dtype, device="meta")
    for name in ("_transpose_kernel", "_block_kernel", "_window_kernel", "_reduce_kernel"):
        setattr(sd, name, _Compile(getattr(sd, name), name.strip("_").replace("_kernel", "")))
    for density, form in ((0.001, "window"), (0.001, "block"), (0.01, "window")):
        k = int(density * out_f * in_f)
        idx = torch.empty(k, dtype=torch.int64, device="meta")
        sd.sampled_grad_sampled(g, x, idx, in_f, splits=2, form=form)


def _nm(args):
    from sparsec.kernels import nm_mask as nm

    nm._usable = lambda *a: True
    nm._nm_kernel = _Compile(nm._nm_kernel, "nm")
    w = torch.empty(4096, 4096, dtype=getattr(torch, args.dtype), device="meta")
    for n, m in ((2, 4), (4, 8), (8, 32)):
        nm.nm_mask(w, n, m)
    nm.nm_apply(w, 2, 4)
    nm.nm_srste_(torch.empty_like(w), w, 1e-3, n=2, m=4)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block", type=int, default=128)
    args = p.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    triton.runtime.driver.set_active(_FakeDriver(args.arch))
    _attention(args)
    _selection(args)
    _sparse_delta(args)
    _nm(args)
    print(f"triton {triton.__version__}, sm_{args.arch}, {args.dtype}, head dim "
          f"{args.head_dim}, block {args.block}")
    print(f"{'kernel':17} {'BLOCK_M':>7} {'BLOCK_N':>7} {'warps':>5} {'stages':>6} {'regs':>4} "
          f"{'stack':>5} {'smem':>6} {'async':>5} mma")
    for r in RESULTS:
        m = r["meta"]
        print(f"{r['kernel']:17} {m.get('BLOCK_M', '-'):>7} {m.get('BLOCK_N', '-'):>7} "
              f"{r['warps'] or '-':>5} {r['stages'] or '-':>6} {r['regs']:>4} {r['stack']:>5} "
              f"{r['smem']:>6} {r['async']:>5} {r['mma']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

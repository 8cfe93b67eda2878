"""Host time of sparsec's attention calls, per layer, and a check that direct launches hand
Triton's compiled launcher exactly the arguments Triton's own path does.

    python tools/host_overhead.py                 # on a GPU: host µs per call, old vs new
    python tools/host_overhead.py --offline       # no GPU: Triton >= 3.6 compiles for sm_90
                                                  # through a stand-in driver whose launcher
                                                  # records its arguments instead of launching

Host time is what the CPU spends issuing one call (perf_counter around the call, the device
queue drained before it): at short lengths it, not the kernel, sets the pace. Rows: the
forward launcher, the backward launcher (each backward variant), the public function
forward, and forward + backward, each with `launch=triton` (every launch through Triton's
JIT and autotuner; the public function through the custom op) and with the new path (cached
plans and direct launches; the public function through a plain autograd.Function).

--offline also checks, for the forward and both backward variants, that a direct launch's
arguments equal those of a launch through Triton (except the per-call tensors) and that the
recorded launches differ only in the per-call tensors' addresses. Exit status 1 if not.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

CALLS: list[tuple] = []
RECORD = [False]  # the stand-in launcher keeps its arguments only while checking (holding
# gradient tensors would make autograd copy them instead of taking them)


def install_fake_driver(arch: int = 90) -> None:
    """Triton compiles for `arch` and 'launches' by recording the launcher's arguments."""
    import triton
    from kernel_report import _FakeDriver

    class Utils:
        def load_binary(self, name, kernel, shared, device):
            return (1, 1, 0, 0, 1024)

        def get_device_properties(self, device):
            return {"max_shared_mem": 232448, "multiprocessor_count": 132}

    class Launcher:
        def __init__(self, src, metadata):
            self.name = getattr(getattr(src, "fn", None), "__name__", "?")

        def __call__(self, *args):
            if RECORD[0]:
                CALLS.append((self.name, args))

    driver = _FakeDriver(arch)
    driver.utils = Utils()
    driver.launcher_cls = Launcher
    driver.get_active_torch_device = lambda: torch.device("cpu")
    triton.runtime.driver.set_active(driver)
    torch._C._cuda_getCurrentRawStream = lambda index: 0

    import sparsec.ops.block_sparse_attention as ops
    from sparsec.kernels import _attention_common as ac
    from sparsec.kernels import block_sparse_attention as fwd
    from sparsec.kernels import block_sparse_attention_bwd as bwd

    ac.kernel_supports = fwd.kernel_supports = bwd.kernel_supports = lambda *a: None
    ac.launch_device = lambda t: 0 if ac.direct_enabled() else None
    ops._kernel = lambda q, name: getattr(fwd, name)
    ops._eager_kernels = lambda *a: __import__("sparsec.kernels._triton", fromlist=["x"]
                                               ).SETTINGS.eager == "function"


def host_us(fn, n: int, device: bool) -> float:
    """Median host microseconds of one call, the device queue drained before each."""
    fn()
    fn()
    times = []
    for _ in range(n):
        if device:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _addr(a):
    return a.data_ptr() if isinstance(a, torch.Tensor) else a


def check_direct(run, slots_of) -> list[str]:
    """Launch via Triton once, then twice via the direct path (first builds the plan,
    second replays it); compare the recorded launcher arguments. `slots_of(name)` = the
    argument positions that may differ (per-call tensors)."""
    from sparsec.kernels._triton import settings

    problems = []
    RECORD[0] = True
    with settings(launch="triton"):
        CALLS.clear()
        run()
        ref = list(CALLS)
    with settings(launch="direct"):
        run()
        CALLS.clear()
        run()
        direct = list(CALLS)
    RECORD[0] = False
    CALLS.clear()
    if [n for n, _ in ref] != [n for n, _ in direct]:
        return [f"kernels differ: {[n for n, _ in ref]} vs {[n for n, _ in direct]}"]
    for (name, a), (_, b) in zip(ref, direct):
        # 0-2 grid, 3 stream, 4 function, 5 packed metadata, 6 launch metadata, 7-8 hooks
        a, b = [_addr(x) for x in a], [_addr(x) for x in b]
        if a[:6] != b[:6] or len(a) != len(b):
            problems.append(f"{name}: grid/function/metadata differ: {a[:6]} vs {b[:6]}")
        allowed = slots_of(name)
        bad = [i - 9 for i in range(9, len(a)) if a[i] != b[i] and (i - 9) not in allowed]
        if bad:
            problems.append(f"{name}: arguments {bad} differ: "
                            f"{[(a[i + 9], b[i + 9]) for i in bad]}")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--offline", action="store_true", help="no GPU: stand-in driver (Triton)")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--iters", type=int, default=200)
    args = p.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if args.offline:
        os.environ["SPARSEC_AUTOTUNE"] = "0"  # nothing can be timed
        install_fake_driver()
        dev = "cpu"
    elif not torch.cuda.is_available():
        print("host_overhead: no CUDA GPU; use --offline", file=sys.stderr)
        return 2
    else:
        dev = "cuda"
    from bench_attention import random_causal_layout

    import sparsec
    from sparsec.kernels import block_sparse_attention as fwd
    from sparsec.kernels import block_sparse_attention_bwd as bwd
    from sparsec.kernels._triton import settings

    L, H, D, blk = args.length, args.heads, args.dim, args.block
    lay = random_causal_layout(L, H, 0.16, 0) if blk == 128 else \
        sparsec.layouts.sliding_window(L, window=4 * blk, sink=blk, block=blk)
    lay = lay.to(dev)
    q, k, v, do = (torch.randn(1, H, L, D, device=dev, dtype=torch.bfloat16) for _ in range(4))
    opargs = (*lay.tensors(), None, D ** -0.5, True, lay.block_q, lay.block_kv)
    out, lse = fwd.block_sparse_attention(q, k, v, *opargs)
    problems = []
    if args.offline:
        problems += check_direct(lambda: fwd.block_sparse_attention(q, k, v, *opargs),
                                 lambda name: {0, 1, 2, 3, 4, 9})
        bwd_slots = {"_bwd_preprocess_kernel": {0, 1, 2, 3},
                     "_bwd_dkdv_kernel": {0, 1, 2, 3, 4, 5, 6, 7, 8, 13},
                     "_bwd_dq_kernel": {0, 1, 2, 3, 4, 5, 6, 7, 12, 13},
                     "_dq_convert_kernel": {0, 1}}
        for variant in ("split", "atomic"):
            problems += [f"{variant}: {m}" for m in check_direct(
                lambda: bwd.block_sparse_attention_backward(do, q, k, v, out, lse, *opargs,
                                                            variant=variant),
                lambda name: bwd_slots[name])]
    qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))

    def fwdbwd():
        sparsec.block_sparse_attention(qg, kg, vg, lay).backward(do)
        qg.grad = kg.grad = vg.grad = None

    rows = []
    cases = [("fwd launcher", lambda: fwd.block_sparse_attention(q, k, v, *opargs))]
    for variant in ("split", "atomic"):
        cases.append((f"bwd launcher ({variant})", lambda variant=variant:
                      bwd.block_sparse_attention_backward(do, q, k, v, out, lse, *opargs,
                                                          variant=variant)))
    cases += [("public fwd (grad)", lambda: sparsec.block_sparse_attention(qg, kg, vg, lay)),
              ("public fwd+bwd", fwdbwd)]
    on_gpu = dev == "cuda"
    for name, fn in cases:
        with settings(launch="triton", eager="op"):
            old = host_us(fn, args.iters, on_gpu)
        with settings(launch="direct", eager="function"):
            new = host_us(fn, args.iters, on_gpu)
        rows.append((name, old, new))
    where = torch.cuda.get_device_name() if on_gpu else "offline (stand-in driver, this CPU)"
    import triton

    print(f"\nhost time per call, µs (median of {args.iters}; {where}; triton "
          f"{triton.__version__}; L={L}, {H} heads, head dim {D}, blocks of {blk})")
    print(f"{'call':26} {'old':>8} {'new':>8} {'old/new':>8}")
    for name, old, new in rows:
        print(f"{name:26} {old:8.1f} {new:8.1f} {old / new:7.1f}x")
    if args.offline:
        print("direct launches match Triton's: " + ("yes" if not problems else "NO"))
        for m in problems:
            print("  " + m)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""Look inside two kinds of zoo cell failure (GPU or CPU): which tensors make up a joint-graph
gradient error, and whether the attention kernel or the reference drifts from a float64
oracle on the inputs a model really gives it.

    python tools/diagnose_cells.py --device cuda --joint opt --attention t5-encoder

Prints, for `--joint M`: the gradient check of M's joint cell, tensor by tensor (normwise
error, the tensor's gradient norm and RMS, next to the RMS over all gradients). For
`--attention M`: per call of the attention kernel in M's attention cell, the mask's shape,
dtype and range, the scale, and the max error of the kernel and of the gathered torch
implementation (in the inputs' dtype) against the float64 reference.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sparsec  # noqa: E402
from sparsec.testing import zoo, zoo_matrix  # noqa: E402


def _config(device: str, seq: int, workdir: str) -> zoo_matrix.MatrixConfig:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return zoo_matrix.MatrixConfig(device=device, dtype=dtype, seq=seq, batch=2, width=256,
                                   layers=2, heads=4,
                                   backend="triton" if device == "cuda" else "eager",
                                   block=64, workdir=workdir)


def joint(name: str, cfg: zoo_matrix.MatrixConfig) -> None:
    from sparsec.joint import eager_step
    from sparsec.compare import _tensor_errors

    m = zoo_matrix.MatrixModel(zoo.get(name), cfg)
    c = sparsec.compile(m.program(), passes=["joint-graph:lr=0.001", "prune-backward"],
                        backend="eager", verify=False)
    check = c.report.get("grad_check", {})
    print(f"== joint {name}: report rel_l2_err {check.get('rel_l2_err', 'n/a')}")
    p, info = c.program, c.program.joint
    _, eager = eager_step(info.forward, p.source.loss, info.n_model_inputs, p.example_inputs,
                          info.optimizer, info.trainable)
    _, effects = p.step_effects(*p.example_inputs)
    ref = eager["gradients"]
    total = sum(float(g.double().pow(2).sum()) for g in ref.values())
    rms = math.sqrt(total / sum(g.numel() for g in ref.values()))
    rows = []
    for n, g in effects["gradients"].items():
        e = ref[n].double()
        _, _, diff, norm = _tensor_errors(g.double(), e)
        l2 = diff / max(norm, 1e-30)  # unfloored: this table shows each tensor's own error
        rows.append((l2, n, float(e.norm()), float(e.pow(2).mean().sqrt()), diff, e.numel()))
    rows.sort(reverse=True)
    print(f"RMS over all gradients {rms:.3g}")
    for l2, n, norm, trms, diff, numel in rows[:12]:
        print(f"  {l2:9.3g}  {n:55s} norm {norm:9.3g} rms {trms:9.3g} |diff| {diff:9.3g} "
              f"numel {numel}")


def attention(name: str, cfg: zoo_matrix.MatrixConfig) -> None:
    from sparsec.ops import block_sparse_attention as ops
    from sparsec.ops.attention_reference import (block_sparse_attention_gathered,
                                                 block_sparse_attention_ref)

    mod = ops.kernel_module()
    calls = []
    if mod is not None:
        kernel = mod.block_sparse_attention

        def watched(*args):
            out = kernel(*args)
            calls.append(_compare(args, out[0], block_sparse_attention_ref,
                                  block_sparse_attention_gathered))
            return out
        mod.block_sparse_attention = watched
    m = zoo_matrix.MatrixModel(zoo.get(name), cfg)
    print(f"== attention {name}")
    try:
        result = zoo_matrix.run_cell(m, "attention")
    except Exception as e:  # the kernel calls made before verification failed still tell
        result = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    finally:
        if mod is not None:
            mod.block_sparse_attention = kernel
    for line in calls[:8]:
        print("  " + line)
    if not calls:
        print("  (no kernel calls: the torch implementation ran)")
    print(f"  result: {result}")


def _compare(args: tuple, out: torch.Tensor, ref_fn, gathered_fn) -> str:
    q, k, v, num, idx, fnum, fidx, mask, scale, causal, bq, bkv, softcap = args
    f64 = [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
           for t in args]
    want = ref_fn(*f64)[0]
    gathered = gathered_fn(*args)[0]
    from sparsec.ops.attention_reference import layout_element_mask
    from sparsec.passes.attention_reference_graph import dense_masked_attention
    allowed = layout_element_mask(num, idx, fnum, fidx, q.shape[2], k.shape[2], bq, bkv, causal)
    sdpa = dense_masked_attention(q, k, v, allowed, mask, scale, softcap)
    scale_of = float(want.abs().max())

    def err(x):
        return float((x.double() - want).abs().max()) / max(scale_of, 1e-30)
    m = "none" if mask is None else (
        f"{tuple(mask.shape)} {mask.dtype} [{float(mask.min()):.3g}, {float(mask.max()):.3g}]"
        if mask.is_floating_point() else f"{tuple(mask.shape)} {mask.dtype}")
    return (f"q {tuple(q.shape)} {q.dtype} k {tuple(k.shape)} scale {scale:.4g} causal {causal}"
            f" softcap {softcap} mask {m}: kernel {err(out):.3g}, torch {err(gathered):.3g}, "
            f"pass reference (SDPA) {err(sdpa):.3g} "
            f"(max rel to f64; |ref| max {scale_of:.3g}, kernel nonfinite "
            f"{int((~torch.isfinite(out)).sum())})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--joint", default="", help="comma-separated zoo models")
    p.add_argument("--attention", default="", help="comma-separated zoo models")
    p.add_argument("--workdir", default="/tmp/diagnose_cells")
    a = p.parse_args()
    cfg = _config(a.device, a.seq, a.workdir)
    for name in filter(None, a.joint.split(",")):
        joint(name, cfg)
    for name in filter(None, a.attention.split(",")):
        attention(name, cfg)


if __name__ == "__main__":
    main()

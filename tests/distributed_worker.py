"""A torchrun worker for tests/test_distributed.py (not a test module).

    torchrun --standalone --nproc-per-node 2 tests/distributed_worker.py OUT MODEL BACKEND

Trains MODEL twice in one job, replicated and then with --fsdp (same recipe, no prune–regrow,
which --fsdp refuses), and saves every rank's own deltas as OUT/<mode>-rank<r>.safetensors, so
the test compares ranks with each other and FSDP2 with the replicated run. Rank 0 also writes
OUT/<mode>/ as `sparsec train -o` does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed as dist

from sparsec.training.deltas import extract_deltas, save_deltas
from sparsec.training import train_distributed
from sparsec.training.distributed.launch import setup, teardown


def main(out: Path, model: str, backend: str) -> None:
    env = setup(backend)  # both runs reuse this group
    for mode in ("replicated", "fsdp"):
        run = train_distributed(model, steps=6, passes=("sparse-finetune:density=0.05",),
                                lr=3e-2, verify=False, fsdp=mode == "fsdp", backend=backend,
                                out_dir=out / mode)
        save_deltas(extract_deltas(run.trainer.program),
                    out / f"{mode}-rank{env.rank}.safetensors")
        dist.barrier()
    teardown(env)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])

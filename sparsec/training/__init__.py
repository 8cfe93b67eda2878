"""Training a compiled program, in one process or data-parallel on torch.distributed.

    run = sparsec.train_model("model.py", steps=100, passes=["sparse-finetune"], out_dir="out")
    trainer = sparsec.Trainer(program, lr=1e-3); loss = trainer.step(batch)

One idea a file:

- prepare: the checks and the compile every run starts with (`prepare_training`);
- trainer: the training loop of one process (`Trainer`), regrow: prune–regrow;
- data: the batch stream (cycled, one rank's share), stats: what a run did;
- evaluate: the eval loss during training;
- checkpoint: optimizer.safetensors (resumable state), saver: writing checkpoints atomically;
- deltas: the trained deltas file (extract, save, load, apply);
- run: a one-process run (`train_model`);
- comm: what the ranks exchange; distributed/: launch (the process group and its signals),
  trainer (the data-parallel `DistributedTrainer`), run (`train_distributed`, the torchrun
  run).
"""

from __future__ import annotations

from .distributed import DistributedTrainer, train_distributed
from .run import TrainRun, train_model
from .stats import TrainStats
from .trainer import NonFiniteError, Trainer

__all__ = ["Trainer", "TrainStats", "TrainRun", "NonFiniteError", "train_model",
           "DistributedTrainer", "train_distributed"]

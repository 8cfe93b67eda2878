"""Training a compiled program, in one process or data-parallel on torch.distributed.

    run = sparsec.train_model("model.py", steps=100, passes=["sparse-finetune"], out_dir="out")
    trainer = sparsec.Trainer(program, lr=1e-3); loss = trainer.step(batch)

One idea a file:

- prepare: the checks and the compile every run starts with (`prepare_training`);
- trainer: the training loop of one process (`Trainer`), regrow: prune–regrow;
- batches: the batch stream (cycled, one rank's share), stats: what a run did;
- evaluate: the eval loss during training;
- checkpoint: optimizer.safetensors (resumable state), saver: writing checkpoints atomically;
- run: a one-process run (`train_model`);
- launch: the process group; communication: what the ranks exchange;
  distributed_trainer: the data-parallel `DistributedTrainer`; distributed_run:
  `train_distributed`, the torchrun run.
"""

from __future__ import annotations

from .distributed_run import train_distributed
from .distributed_trainer import DistributedTrainer
from .run import TrainRun, train_model
from .stats import TrainStats
from .trainer import NonFiniteError, Trainer

__all__ = ["Trainer", "TrainStats", "TrainRun", "NonFiniteError", "train_model",
           "DistributedTrainer", "train_distributed"]

"""Training on several processes (torchrun): the launch and its signals (`launch`), the trainer
that averages gradients over ranks (`trainer`), and the run that ties them to checkpoints and
outputs (`run`)."""

from .run import train_distributed
from .trainer import DistributedTrainer

__all__ = ["DistributedTrainer", "train_distributed"]

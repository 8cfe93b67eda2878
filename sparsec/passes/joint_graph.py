"""`joint-graph`: enter stage 2, the whole training step as one graph."""

from __future__ import annotations

from dataclasses import dataclass

from ..joint import build_joint_step, eager_step, example_batch, reached_parameters
from ..optim import OptimizerConfig
from ..program import Program, Prop
from .base import Pass, PassResult, option, register

__all__ = ["JointGraph"]


@register
@dataclass(frozen=True)
class JointGraph(Pass):
    """Trace the training step — forward, loss, backward and optimizer update — ahead of time
    through AOTAutograd into one graph.

    The step is traced as full fine-tuning computes it (a gradient for every parameter);
    only the trainable parameters (after `sparse-finetune` or `freeze`) are updated. Run
    `prune-backward` next to cut the gradients nothing needs. Afterwards the program takes a
    batch (the model's inputs, then the loss's extra items) and returns the loss, updating its
    parameters and optimizer state in place; the forward graph is kept for inference and export.
    Verified against one eager step (torch.optim) on the first training batch.
    """

    name = "joint-graph"
    summary = "trace forward + backward + optimizer step into one graph (stage 2)"
    requires = frozenset({Prop.FORWARD_GRAPH})
    establishes = frozenset({Prop.JOINT_GRAPH})
    invalidates = frozenset({Prop.FORWARD_GRAPH})
    # Held to the normwise relative error of the loss and the gradients (see
    # pipeline.check_metric); measured on tiny_llama: about 1e-6 in float32, 1e-15 in float64.
    rtol = 1e-5
    optimizer: str = option("adamw", "the optimizer traced into the step",
                            choices=("adamw", "sgd"))
    lr: float = option(1e-3, "learning rate", min=0.0, max=10.0)
    beta1: float = option(0.9, "AdamW beta1 (below 1)", min=0.0, max=0.9999)
    beta2: float = option(0.999, "AdamW beta2 (below 1)", min=0.0, max=0.99999)
    eps: float = option(1e-8, "AdamW epsilon", min=1e-12, max=1.0)
    weight_decay: float = option(0.0, "decoupled weight decay", min=0.0, max=1.0)
    momentum: float = option(0.0, "SGD momentum", min=0.0, max=1.0)

    def config(self) -> OptimizerConfig:
        return OptimizerConfig(self.optimizer, self.lr, self.beta1, self.beta2, self.eps,
                               self.weight_decay, self.momentum)

    def run(self, program: Program) -> PassResult:
        step, info, batch = build_joint_step(program, self.config())
        program.gm, program.example_inputs = step, batch
        program.joint = info
        roles = [n.meta.get("sparsec", {}).get("role") for n in step.graph.nodes]
        stats = {r: roles.count(r) for r in ("forward", "backward", "optimizer")}
        stats["trainable_tensors"] = len(info.trainable)
        stats["traced_on"] = info.traced_on
        if info.untrained:  # the loss never reads them (a pooler, say): frozen, and said so
            for n in info.untrained:
                info.forward.get_parameter(n).requires_grad_(False)
            stats["untrained_tensors"] = len(info.untrained)
            program.state.setdefault("report", {})["joint"] = {
                "untrained": info.untrained,
                "note": "trainable parameters the loss does not reach are not trained"}
        return PassResult(modified=True, stats=stats)

    def reference(self, program: Program):
        forward, source = program.gm, program.source
        n_inputs, config = len(program.example_inputs), self.config()
        batch_expected = example_batch(program)
        reached = reached_parameters(forward, source.loss, n_inputs, batch_expected) \
            if source.loss is not None else set()
        trainable = [n for n, p in forward.named_parameters() if p.requires_grad and n in reached]

        def one_eager_step(*batch):
            assert len(batch) == len(batch_expected)
            loss, effects = eager_step(forward, source.loss, n_inputs, batch, config, trainable)
            return (loss,), effects["gradients"]

        one_eager_step.reference_name = "one eager training step (torch.optim)"
        return one_eager_step

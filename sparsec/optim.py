"""Optimizers written as in-place tensor code that traces into a joint graph.

The update follows `torch.optim.AdamW`'s formula with the step count as a tensor, so one traced
graph serves every step; the eager reference is `torch.optim.AdamW` itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["OptimizerConfig", "init_state", "update_", "torch_optimizer", "implied_gradient"]


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adamw"  # "adamw" | "sgd"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd only


def init_state(param: torch.Tensor, config: OptimizerConfig) -> dict[str, torch.Tensor]:
    """The per-parameter state tensors (zeros), like torch.optim creates on the first step."""
    if config.name == "adamw":
        return {"exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}
    if config.name == "sgd" and config.momentum:
        return {"momentum_buffer": torch.zeros_like(param)}
    return {}


def update_(param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
            step: torch.Tensor, config: OptimizerConfig) -> None:
    """Apply one update to `param` in place. `step` is the already incremented step count."""
    if config.name == "sgd":
        _sgd_(param, grad, state, step, config)
        return
    beta1, beta2, lr = config.beta1, config.beta2, config.lr
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    param.mul_(1 - lr * config.weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - torch.pow(beta1, step)
    bias_correction2 = 1 - torch.pow(beta2, step)
    denom = (exp_avg_sq.sqrt() / bias_correction2.sqrt()).add_(config.eps)
    # torch.optim.AdamW's formula with the step size as a tensor (torch's capturable variant
    # divides by the step size instead, which breaks at lr = 0)
    param.addcdiv_(exp_avg * (-lr / bias_correction1), denom)


def _sgd_(param, grad, state, step, config) -> None:
    d_p = grad
    if config.weight_decay:
        d_p = d_p.add(param, alpha=config.weight_decay)
    if config.momentum:
        # torch.optim.SGD copies the first gradient into the buffer; from zeros the same
        # update gives exactly that, so no branch on the step is needed
        buf = state["momentum_buffer"]
        buf.mul_(config.momentum).add_(d_p)
        d_p = buf
    param.add_(d_p, alpha=-config.lr)


def torch_optimizer(params: list[torch.Tensor], config: OptimizerConfig) -> torch.optim.Optimizer:
    """The eager optimizer the traced update must match."""
    if config.name == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, betas=(config.beta1, config.beta2),
                                 eps=config.eps, weight_decay=config.weight_decay, foreach=False)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay, foreach=False)


def implied_gradient(config: OptimizerConfig, param_before: torch.Tensor,
                     state_before: dict[str, torch.Tensor],
                     state_after: dict[str, torch.Tensor],
                     param_after: torch.Tensor) -> torch.Tensor | None:
    """The gradient one update used, recovered from what it wrote; None for plain SGD, whose
    only record is the parameter itself (θ − lr·g rounded to θ's precision loses g).

    AdamW's first moment is linear in the gradient, m' = β₁m + (1 − β₁)g, and so is SGD's
    momentum buffer. Verification compares these gradients rather than Adam's updates, which
    divide by the gradient's magnitude and so turn rounding noise in near-zero gradients into
    full-size differences.
    """
    if config.name == "adamw":
        m0, m1 = state_before["exp_avg"].double(), state_after["exp_avg"].double()
        return ((m1 - config.beta1 * m0) / (1 - config.beta1)).to(param_before.dtype)
    if config.momentum:
        decay = config.weight_decay * param_before.double()
        b0, b1 = state_before["momentum_buffer"].double(), state_after["momentum_buffer"].double()
        return (b1 - config.momentum * b0 - decay).to(param_before.dtype)
    return None

"""Optimiser parameter groups and per-step learning-rate schedules with linear warm-up.

Schedules are plain ``LambdaLR`` objects stepped every optimiser step. Their settings are in
units that mean the same training on 1 or 64 GPUs: the length is the trainer's epochs, decay
milestones are fractions of the run, the warm-up is in epochs (converted with the steps per
epoch of this run). SSD paper, Sec. 3 (VOC2007): lr 1e-3 for 40k iterations then 1e-4 for
10k; the common VOC07+12 recipe is 120k iterations of batch 32 (232 epochs of the 16,551
trainval images) with decays at 80k and 100k, i.e. milestones (2/3, 5/6).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def param_groups(net: nn.Module, no_decay_bias_norm: bool = True) -> list[dict]:
    """Split parameters into a decayed and a non-decayed group.

    Args:
        net: the network.
        no_decay_bias_norm: if true, biases, normalisation parameters and 1-d scales (such as
            the L2Norm scale of conv4_3) get no weight decay; otherwise every parameter gets the
            optimiser's weight decay.

    Returns:
        Parameter groups for a ``torch.optim`` optimiser, each with a ``name``; the decayed
        group takes the optimiser's own ``weight_decay``.
    """
    if not no_decay_bias_norm:
        return [{"name": "all", "params": [p for p in net.parameters() if p.requires_grad]}]
    decay, no_decay = [], []
    for module in net.modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad:
                continue
            is_norm = isinstance(module, _NORM_TYPES) or param.ndim <= 1  # biases are 1-d
            (no_decay if is_norm else decay).append(param)
    return [
        {"name": "decay", "params": decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]


def scaled_lr(lr: float, global_batch_size: int, base_batch_size: int | None) -> float:
    """Linear scaling rule: ``lr * global_batch / base_batch`` (unchanged if base is None)."""
    if base_batch_size is None:
        return lr
    return lr * global_batch_size / base_batch_size


def _warmup_steps(warmup_epochs: float, steps_per_epoch: int, total_steps: int) -> int:
    """Warm-up in steps: ``warmup_epochs`` of this run, capped at a fifth of it (short runs
    still train at full lr)."""
    return min(round(warmup_epochs * steps_per_epoch), total_steps // 5)


def _warmup(step: int, warmup_steps: int, warmup_factor: float) -> float:
    if step >= warmup_steps:
        return 1.0
    alpha = step / warmup_steps
    return warmup_factor * (1 - alpha) + alpha


def warmup_multistep(
    optimizer: Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    milestones: Sequence[float] = (2 / 3, 5 / 6),
    gamma: float = 0.1,
    warmup_epochs: float = 1.0,
    warmup_factor: float = 1e-3,
) -> LambdaLR:
    """Linear warm-up, then the lr times ``gamma`` at each milestone.

    Args:
        optimizer: the optimiser.
        total_steps: optimiser steps of the whole run (``trainer.estimated_stepping_batches``).
        steps_per_epoch: optimiser steps of one epoch of this run.
        milestones: decay points as fractions of ``total_steps``.
        gamma: decay factor at each milestone.
        warmup_epochs: epochs of linear warm-up from ``warmup_factor * lr`` to ``lr``; capped
            at a fifth of the run so short runs still train at full lr.
        warmup_factor: starting fraction of the lr.
    """
    warmup_steps = _warmup_steps(warmup_epochs, steps_per_epoch, total_steps)
    points = sorted(round(m * total_steps) for m in milestones)

    def factor(step: int) -> float:
        decays = sum(step >= p for p in points)
        return _warmup(step, warmup_steps, warmup_factor) * gamma**decays

    return LambdaLR(optimizer, factor)


def warmup_cosine(
    optimizer: Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    warmup_epochs: float = 1.0,
    warmup_factor: float = 1e-3,
    min_factor: float = 0.0,
) -> LambdaLR:
    """Linear warm-up (``warmup_epochs``), then cosine decay to ``min_factor * lr`` at
    ``total_steps``; arguments as :func:`warmup_multistep`."""
    warmup_steps = _warmup_steps(warmup_epochs, steps_per_epoch, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps, warmup_factor)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)

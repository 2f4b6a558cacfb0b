"""The learning-rate schedules of the methods' recipes.

A method's config names its optimiser and schedule as Hydra partials (`method.optimizer`,
`method.scheduler`, `_partial_: true`, as the lightning-hydra-template does); the run builds them
(`src.methods.base.build_method`) and `Method.configure_optimizers` calls them: the optimiser on
the parameters that train, then the schedule on that optimiser and the run's length. A schedule
here is such a factory: `schedule(optimizer, length, **options)` gives Lightning's lr-scheduler
dict (the scheduler and whether it steps per epoch or per optimiser step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR


@dataclass(frozen=True)
class RunLength:
    """How long a run trains: its epochs and its optimiser steps in all (inf when neither the
    epochs nor trainer.max_steps bound it)."""

    epochs: int
    steps: float

    @classmethod
    def of(cls, trainer: Any) -> RunLength:
        """The length of the run a Lightning trainer is about to fit."""
        return cls(epochs=trainer.max_epochs, steps=trainer.estimated_stepping_batches)


def warmup_cosine_factors(
    lr: float, warmup_lr: float, warmup_epochs: int, epochs: int
) -> Callable[[int], float]:
    """LR factor per epoch: constant `warmup_lr` for the warm-up epochs, then the cosine of the
    reference (CoOp on Dassl), lr * 0.5 * (1 + cos(pi * (e - warmup) / epochs))."""
    if lr <= 0:
        raise ValueError(f"method.optimizer.lr={lr}: the learning rate must be positive")

    def factor(epoch: int) -> float:
        if epoch < warmup_epochs:
            return warmup_lr / lr
        return 0.5 * (1 + math.cos(math.pi * (epoch - warmup_epochs) / epochs))

    return factor


def warmup_cosine(
    optimizer: torch.optim.Optimizer, length: RunLength, warmup_epochs: int = 1, warmup_lr: float = 1e-5
) -> dict[str, Any]:
    """CoOp's schedule, stepped once per epoch: every parameter group warms up at `warmup_lr`,
    then follows the cosine from its own lr over the run's epochs."""
    factors = [
        warmup_cosine_factors(group["lr"], warmup_lr, warmup_epochs, length.epochs)
        for group in optimizer.param_groups
    ]
    return {"scheduler": LambdaLR(optimizer, factors), "interval": "epoch"}


def cosine(optimizer: torch.optim.Optimizer, length: RunLength, eta_min: float = 0.0) -> dict[str, Any]:
    """The cosine from each group's lr to `eta_min` over the run's optimiser steps, stepped per step
    (CLIP-LoRA's, Tip-Adapter-F's)."""
    if not math.isfinite(length.steps):
        raise ValueError(
            "method.scheduler counts optimiser steps and the run has no bound: set trainer.max_steps "
            "or trainer.max_epochs"
        )
    schedule = CosineAnnealingLR(optimizer, T_max=int(length.steps), eta_min=eta_min)
    return {"scheduler": schedule, "interval": "step"}

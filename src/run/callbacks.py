"""Lightning callbacks of the training runs (conf/callbacks/)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite: a setting (precision, learning rate) to change."""


class StopOnNonFiniteLoss(pl.Callback):
    """Stops the run at the first NaN/inf training loss, with one line saying where and what to try.

    Lightning would otherwise train on, and the run would end with a NaN context, a chance-level
    accuracy and a results.json that looks like any other. fp16 autocast (`16-mixed`) is where
    this happens in practice: its range is small, bf16 has fp32's. On an accelerator the losses are
    checked at the log interval (trainer.log_every_n_steps) and at the end of each epoch.
    """

    def __init__(self) -> None:
        self._finite: torch.Tensor | None = None  # on an accelerator: all losses since the last check

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        finite = torch.isfinite(loss.detach()).all()
        if loss.device.type != "cpu":
            # Reading the flag waits for the step to finish on the device: at the log interval only.
            self._finite = finite if self._finite is None else self._finite & finite
            if (batch_idx + 1) % trainer.log_every_n_steps and not trainer.is_last_batch:
                return
            finite, self._finite = self._finite, None
        if not finite:
            raise NonFiniteLossError(
                f"training loss is {loss.item()} at epoch {trainer.current_epoch}, batch {batch_idx} "
                f"(precision {trainer.precision}): the run stopped; try trainer.precision=bf16-mixed or "
                "32-true, or a lower method.optimizer.lr"
            )

"""Each run's own state in a pack: its random stream, its loader on that stream, and its method,
optimiser, schedule, loggers and progress, written as the checkpoint of the run trained alone.

Each run keeps the state of torch's global generator that it would have alone (`RandomStream`):
seeded with its seed after building CLIP (whose construction draws too), drawn by its context's
initialisation and then only by its own data order and augmentations. It is swapped in around
everything that draws for the run, so on the CPU a packed run sees the same batches as alone, bit
for bit, and ends with the same context to float rounding (the shared passes add and multiply in
other orders).

Lightning internals: `run_loops` writes the loop state of Lightning's checkpoint format (its
`fit_loop` progress counters) for the run alone at the end of an epoch, so that a packed run
resumes alone and a run killed alone resumes in a pack; Lightning has no public API that builds
it for a run it did not train.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import Logger
from torch.utils.data import DataLoader

from src.methods.base import Method
from src.run.callbacks import StopOnNonFiniteLoss
from src.run.checks import CheckedRun
from src.run.resume import RandomState


class RandomStream:
    """A run's own state of torch's global generator: what draws for the run draws from it, and
    leaves the generator as it was for whatever runs next."""

    def __init__(self, state: torch.Tensor) -> None:
        self.state = state

    def drawing(self, function, *args: Any) -> Any:
        """`function(*args)`, drawing from the run's stream."""
        outside = torch.get_rng_state()
        torch.set_rng_state(self.state)
        try:
            return function(*args)
        finally:
            self.state = torch.get_rng_state()
            torch.set_rng_state(outside)


class StreamLoader:
    """A run's train loader iterated on its own stream: the loader's seeds, the sampler's order and
    the augmentations are the run's."""

    def __init__(self, loader: DataLoader, stream: RandomStream) -> None:
        self.loader = loader
        self.stream = stream

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        iterator = self.stream.drawing(iter, self.loader)
        while True:
            try:
                batch = self.stream.drawing(next, iterator)
            except StopIteration:
                return
            yield batch


class PackedRun:
    """One run of a pack: its config and folder, data, method, optimiser, schedule, random stream,
    loggers and progress (Lightning's counters of the run trained alone)."""

    def __init__(self, cfg: DictConfig, checked: CheckedRun) -> None:
        self.cfg = cfg
        self.out = Path(cfg.paths.output_dir)
        self.datamodule = checked.datamodule
        self.last: Path | None = None  # the checkpoint it continues from
        self.module: Method | None = None
        self.stream: RandomStream | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.max_epochs = int(cfg.trainer.max_epochs)
        self.start_epoch = 0  # the first epoch to train (after a checkpoint's)
        self.steps = 0  # optimiser steps so far (Lightning's global step)
        self.epoch_steps = 0
        self.finite: torch.Tensor | None = None  # every loss so far finite (checked without a sync)
        self.failed: str | None = None  # why it stopped (a non-finite loss): the others go on
        # the run's own trainer (the checks built it) is not run: its loggers and callbacks' settings
        self.loggers: list[Logger] = checked.trainer.loggers
        callbacks = checked.trainer.callbacks
        self.checkpoint = next((c for c in callbacks if isinstance(c, ModelCheckpoint)), None)
        self.lr_monitor = any(isinstance(c, LearningRateMonitor) for c in callbacks)
        self.stop_on_non_finite = any(isinstance(c, StopOnNonFiniteLoss) for c in callbacks)
        self.keeps_random_state = any(isinstance(c, RandomState) for c in callbacks)
        self.log_every = int(cfg.trainer.get("log_every_n_steps") or 50)
        self.validate_every = cfg.trainer.get("check_val_every_n_epoch") or 1

    @property
    def checkpoint_path(self) -> Path | None:
        if self.checkpoint is None:
            return None
        return Path(self.checkpoint.dirpath) / f"{self.checkpoint.filename}{self.checkpoint.FILE_EXTENSION}"

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Continues from a checkpoint of this run, written alone or in a pack (Lightning's format)."""
        self.module.load_state_dict(checkpoint["state_dict"], strict=False)  # CLIP's weights are not in it
        self.optimizer.load_state_dict(checkpoint["optimizer_states"][0])
        self.scheduler.load_state_dict(checkpoint["lr_schedulers"][0])
        random_state = checkpoint.get("callbacks", {}).get(RandomState.__qualname__)
        if random_state is not None:  # as Lightning restores it for the run alone (src/run/resume.py)
            self.stream.state = random_state["torch"]
        self.start_epoch = checkpoint["epoch"] + 1
        self.steps = checkpoint["global_step"]

    def lightning_checkpoint(self, epoch: int, loops: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint in the format Lightning writes for this run alone at the end of `epoch` (one
        it resumes from, packed or alone): the run's own state and torch stream; `loops` is the pack
        trainer's, its counters set to this run's."""
        random_state = RandomState().state_dict()
        random_state["torch"] = self.stream.state
        checkpoint = {
            "epoch": epoch,
            "global_step": self.steps,
            "pytorch-lightning_version": pl.__version__,
            "state_dict": self.module.state_dict(),
            "loops": run_loops(loops, epoch, self.steps, self.epoch_steps),
            "callbacks": {RandomState.__qualname__: random_state} if self.keeps_random_state else {},
            "optimizer_states": [self.optimizer.state_dict()],
            "lr_schedulers": [self.scheduler.state_dict()],
        }
        if self.module.hparams:
            checkpoint["hparams_name"] = getattr(self.module, "_hparams_name", "kwargs")
            checkpoint["hyper_parameters"] = dict(self.module.hparams)
        self.module.on_save_checkpoint(checkpoint)  # without CLIP's weights, with the prompt
        return checkpoint


def run_loops(loops: dict[str, Any], epoch: int, steps: int, epoch_steps: int) -> dict[str, Any]:
    """Lightning's loop state of a run trained alone at the end of `epoch` (0-based), after `steps`
    optimiser steps, `epoch_steps` of them in that epoch: one step per batch, the schedule stepped
    once per epoch."""
    loops = copy.deepcopy(loops)
    fit = loops["fit_loop"]

    def counts(fields: tuple[str, ...], total: int, current: int) -> dict[str, dict[str, int]]:
        return {"total": dict.fromkeys(fields, total), "current": dict.fromkeys(fields, current)}

    batch = ("ready", "started", "processed", "completed")
    epochs = {"ready": epoch + 1, "started": epoch + 1, "processed": epoch + 1, "completed": epoch}
    fit["epoch_progress"] = {"total": dict(epochs), "current": dict(epochs)}
    fit["epoch_loop.batch_progress"] = {**counts(batch, steps, epoch_steps), "is_last_batch": True}
    fit["epoch_loop.scheduler_progress"] = counts(("ready", "completed"), epoch + 1, 1)
    fit["epoch_loop.state_dict"] = {"_batches_that_stepped": steps}
    fit["epoch_loop.automatic_optimization.optim_progress"] = {
        "optimizer": {
            "step": counts(("ready", "completed"), steps, epoch_steps),
            "zero_grad": counts(("ready", "started", "completed"), steps, epoch_steps),
        }
    }
    fit["epoch_loop.manual_optimization.optim_step_progress"] = counts(("ready", "completed"), 0, 0)
    return loops

"""The pack as one LightningModule: its runs' training steps share one pass of each frozen encoder.

A few-shot step of one run is little work (a text pass over its class prompts, a batch of image
features): on a GPU the device waits for kernel launches, on a CPU the step waits for Python and
Lightning. A pack shares what does not depend on the run: one CLIP, one image-encoder pass over all
runs' batches of a step (none on cached features), one text-encoder pass over all runs' prompts
(`TextEncoder` takes the prompts of runs laid out alike as one stack), the test set's features and
pass. Each run's loss is its method's own `loss_terms` on those features, summed as the contract's
training step sums them (`total_loss`); each run steps its own optimiser and schedule.

Lightning internals: the checkpoint each run writes is the one Lightning writes for the run alone,
loop state included (src/packing/runs.py, `run_loops`), read here from the trainer's loops'
`state_dict()`, a public method whose layout Lightning does not document.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.seed import pl_worker_init_function
from pytorch_lightning.utilities import CombinedLoader
from torch import nn
from torch.utils.data import DataLoader, Dataset

from src.common.files import save_torch
from src.methods.base import LIGHTNING_HOOKS, Method, overridden, term_metrics, total_loss
from src.methods.coop import CoOp
from src.models.clip import FrozenCLIP
from src.packing.runs import PackedRun, StreamLoader
from src.run.callbacks import NonFiniteLossError

log = logging.getLogger(__name__)


def stack_key(module: Method) -> tuple:
    """Runs whose prompts are laid out alike (EOS positions, shared prefix length) are encoded as
    one stack (`TextEncoder`)."""
    learner = module.prompt_learner
    return learner.shared_len, tuple(learner.eos.tolist())


def packed_text_features(clip: FrozenCLIP, modules: list[Method], keys: list[tuple]) -> list[torch.Tensor]:
    """Each method's class text features [n_cls, d], the runs of equal `keys` in one text pass."""
    features: list[torch.Tensor | None] = [None] * len(modules)
    stacks: dict[tuple, list[int]] = defaultdict(list)
    for index, key in enumerate(keys):
        stacks[key].append(index)
    for indices in stacks.values():
        inputs = [modules[i].text_inputs() for i in indices]
        _, eos, shared_len = inputs[0]
        encoded = clip.text(torch.stack([prompts for prompts, _, _ in inputs]), eos, shared_len)
        for i, text in zip(indices, encoded, strict=True):
            features[i] = text
    return features


def packed_loss_terms(
    clip: FrozenCLIP,
    modules: list[CoOp],
    keys: list[tuple],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
) -> list[dict[str, torch.Tensor]]:
    """Each run's loss terms on its batch (the method's own `loss_terms`, given the features the
    run alone would compute with `features`): the runs' images through the image encoder in one
    pass and their prompts through the text encoder in one pass per stack."""
    inputs = [images for images, _ in batches]
    if inputs[0].ndim == 2:  # cached image features
        image_features = inputs
    else:
        image_features = clip.image_features(torch.cat(inputs)).split([len(x) for x in inputs])
    text_features = packed_text_features(clip, modules, keys)
    return [
        module.loss_terms(images, labels, (image, text))
        for module, image, text, (images, labels) in zip(
            modules, image_features, text_features, batches, strict=True
        )
    ]


# What the pack computes for all its runs at once in place of each run's own: a method that
# defines any of these otherwise than CoOp would train (or be tested) otherwise than alone.
COMPUTED_BY_THE_PACK = ("features", "image_features", "text_features", "forward")
# The Lightning hooks of its runs' methods that the pack calls, each at the place Lightning would.
CALLED_BY_THE_PACK = ("on_validation_epoch_start", "on_validation_epoch_end", "on_save_checkpoint")


def step_refusal(cls: type[Method]) -> str | None:
    """Why the runs of method `cls` cannot train in a pack (None: they can), derived from what the
    pack runs of each: CoOp's model (`text_inputs`, `logits`, `optimization`) and the method's own
    `loss_terms` on features the pack computes (`COMPUTED_BY_THE_PACK`) for all runs at once."""
    if not issubclass(cls, CoOp):
        return "trains each run on its own (a pack trains CoOp-family methods, sharing their encoders)"
    if cls.needs_images:
        return "trains each run on its own (its prompts change the image encoder: no image pass to share)"
    if not cls.text_classifier:
        return "trains each run on its own (its class text features depend on the image)"
    hooks = LIGHTNING_HOOKS - set(CALLED_BY_THE_PACK)
    changed = overridden(cls, CoOp, hooks | set(COMPUTED_BY_THE_PACK))
    if changed:
        return f"overrides {', '.join(changed)}, which a pack does not run: its runs train alone"
    return None


class PackedRuns(pl.LightningModule):
    """The runs of a pack as one LightningModule: each step trains every run that has a batch left
    in the epoch (runs of other seeds may have fewer), each with its own optimiser and schedule;
    each epoch ends as each run's own would (schedule step, validation, checkpoint, logs).

    `first_epoch`: the epoch the runs continue from (all from the same one); the trainer counts
    from 0 to max_epochs - first_epoch.
    """

    def __init__(self, clip: FrozenCLIP, runs: list[PackedRun], first_epoch: int) -> None:
        super().__init__()
        self.automatic_optimization = False  # an optimiser per run, each stepped as its own
        self.clip = clip
        self.runs = runs
        self.methods = nn.ModuleList(run.module for run in runs)
        self.keys = [stack_key(run.module) for run in runs]
        self.first_epoch = first_epoch
        self.test_metrics: list[dict[str, float]] = []
        self._val_loaders: dict[int, DataLoader] | None = None

    @property
    def epoch(self) -> int:
        """The runs' own epoch."""
        return self.first_epoch + self.current_epoch

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [run.optimizer for run in self.runs]

    def train_dataloader(self) -> CombinedLoader:
        """The runs' own loaders, each over the train set the run alone reads (decoded in memory
        when it fits data.in_memory_max_gb, as alone: the same augmentation); runs of equal few-shot
        images (and, for cached views, seed) share it."""
        shared: dict[tuple, Dataset] = {}
        streams = []
        for run in self.runs:
            dm = run.datamodule
            images = tuple((item.path, item.label) for item in dm.train_items)
            key = (images, dm.seed if dm.train_views else None)  # cached views are drawn per seed
            if key not in shared:
                shared[key] = dm.train_data()
            loader = dm.train_loader(shared[key])
            if int(os.environ.get("PL_SEED_WORKERS", 0)) and loader.worker_init_fn is None:
                # what Lightning does to the train loader it is given (Lightning does not see the
                # loaders inside a StreamLoader): workers seeded from the loader's base seed
                loader.worker_init_fn = partial(pl_worker_init_function, rank=self.global_rank)
            streams.append(StreamLoader(loader, run.stream))
        if len(shared) < len(self.runs):
            log.info("%d runs share %d few-shot train sets", len(self.runs), len(shared))
        return CombinedLoader(streams, mode="max_size")

    def test_dataloader(self) -> DataLoader:
        first = self.runs[0].datamodule
        for run in self.runs[1:]:
            if run.datamodule.test_items != first.test_items:
                raise ValueError(
                    f"{run.out} and {self.runs[0].out} have other test sets: they cannot be packed"
                )
        return first.test_dataloader()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not self.trainer.training:
            return batch
        return [
            None if part is None else run.datamodule.on_after_batch_transfer(part, 0)
            for run, part in zip(self.runs, batch, strict=True)
        ]

    def on_train_epoch_start(self) -> None:
        for run in self.runs:
            run.epoch_steps = 0

    def training_step(self, batch: list, batch_idx: int) -> None:
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        active = [i for i, part in enumerate(batch) if part is not None and self.runs[i].failed is None]
        for i in active:
            run = self.runs[i]
            if run.lr_monitor and self._logs_now(run):  # LearningRateMonitor, at the batch's start
                lr = run.optimizer.param_groups[0]["lr"]
                run.log_metrics({f"lr-{type(run.optimizer).__name__}": lr}, step=run.steps)
        terms = packed_loss_terms(
            self.clip,
            [self.runs[i].module for i in active],
            [self.keys[i] for i in active],
            [batch[i] for i in active],
        )
        losses = [total_loss(run_terms) for run_terms in terms]
        self.manual_backward(torch.stack(losses).sum())  # each run's context gets its own loss's gradient
        for i, loss, run_terms in zip(active, losses, terms, strict=True):
            run = self.runs[i]
            optimizers[i].step()
            optimizers[i].zero_grad()
            if run.stop_on_non_finite:  # as StopOnNonFiniteLoss: every step on a CPU, else at log steps
                finite = torch.isfinite(loss.detach())
                run.finite = finite if run.finite is None else run.finite & finite
                if self.device.type == "cpu" or self._logs_now(run):
                    self._stop_if_non_finite(run)
            if self._logs_now(run) and run.failed is None:  # as the step logs for the run alone
                logged = {name: term.item() for name, term in term_metrics(run_terms).items()}
                run.log_metrics({"train/loss": loss.item(), **logged, "epoch": self.epoch}, step=run.steps)
            run.steps += 1
            run.epoch_steps += 1

    def _stop_if_non_finite(self, run: PackedRun) -> None:
        """Stops a run whose loss was not finite, as StopOnNonFiniteLoss stops it alone (its last
        checkpoint kept, no results); the pack's other runs go on, and the pack fails when they end
        (`train_packed`), or at once when no run is left."""
        if run.failed is not None or run.finite is None or bool(run.finite):
            return
        run.failed = (
            f"{run.out}: training loss is not finite at epoch {self.epoch} (precision "
            f"{self.trainer.precision}): try trainer.precision=bf16-mixed or 32-true, or a lower "
            "method.optimizer.lr"
        )
        log.error("%s; the pack's other runs go on", run.failed)
        if all(r.failed is not None for r in self.runs):
            raise NonFiniteLossError("; ".join(r.failed for r in self.runs))

    @staticmethod
    def _logs_now(run: PackedRun) -> bool:
        """Lightning logs a run's step every trainer.log_every_n_steps steps."""
        return (run.steps + 1) % run.log_every == 0

    def on_train_epoch_end(self) -> None:
        epoch, loops = self.epoch, None
        for run in self.runs:
            self._stop_if_non_finite(run)  # as StopOnNonFiniteLoss at the epoch's end
        running = [run for run in self.runs if run.failed is None]
        for run in running:
            run.scheduler.step()  # the schedule's interval: the epoch
        if (epoch + 1) % self.runs[0].validate_every == 0:
            self._validate(running)
        for run in running:
            path, every = run.checkpoint_path, run.checkpoint and run.checkpoint.every_n_epochs
            if path is not None and every and ((epoch + 1) % every == 0 or epoch + 1 == run.max_epochs):
                loops = loops or self._loops()
                save_torch(path, run.lightning_checkpoint(epoch, loops))
            for logger in run.loggers:
                logger.save()

    def _loops(self) -> dict[str, Any]:
        """The trainer's loop states, as Lightning writes them into a checkpoint."""
        trainer = self.trainer
        loops = ("fit_loop", "validate_loop", "test_loop", "predict_loop")
        return {name: getattr(trainer, name).state_dict() for name in loops}

    def validate_last(self) -> list[float]:
        """Each run's accuracy (0-1) on its few-shot val set after training, logged as the run alone
        logs its `trainer.validate` (a trial of a search: src/run/search.py)."""
        return self._validate(self.runs)

    def _validate(self, runs: list[PackedRun]) -> list[float]:
        """Each run's accuracy on its few-shot val set, logged as Lightning logs it for the run alone
        (at the epoch's last step); validation draws nothing from the runs' streams."""
        if self._val_loaders is None:
            self._val_loaders = {id(run): run.datamodule.val_dataloader() for run in self.runs}
        accs = []
        for run in runs:
            loader = self._val_loaders[id(run)]
            method = run.module
            method.on_validation_epoch_start()
            with torch.no_grad(), self.trainer.precision_plugin.forward_context():
                for images, labels in loader:
                    method.val_acc.update(method(images.to(self.device)), labels.to(self.device))
            method.on_validation_epoch_end()
            accs.append(method.val_acc.compute().item())
            run.log_metrics({"val/acc": accs[-1], "epoch": self.epoch}, step=run.steps - 1)
            method.val_acc.reset()
        return accs

    def on_test_epoch_start(self) -> None:
        self._test_text = [run.module.text_features() for run in self.runs]

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        features = self.clip.image_features(images)  # once for all runs
        for run, text in zip(self.runs, self._test_text, strict=True):
            logits = run.module.logits(features, text)
            run.module.test_acc.update(logits, labels)
            run.module.test_macro_acc.update(logits, labels)

    def on_test_epoch_end(self) -> None:
        self.test_metrics = []
        for run in self.runs:
            metrics = {
                "test/acc": run.module.test_acc.compute().item(),
                "test/macro_acc": run.module.test_macro_acc.compute().item(),
            }
            if run.failed is None:
                run.log_metrics({**metrics, "epoch": run.max_epochs}, step=run.steps)
            self.test_metrics.append(metrics)
        self._test_text = None

"""Runs trained together (`pack=true`): the runs of a sweep that differ only in seed and context
settings, trained as one job on one frozen CLIP.

A few-shot step of one run is little work (a text pass over its class prompts, a batch of image
features): on a GPU the device waits for kernel launches, on a CPU the step waits for Python and
Lightning. A pack shares what does not depend on the run: one CLIP, one image-encoder pass over all
runs' batches of a step (none on cached features), one text-encoder pass over all runs' prompts
(`TextEncoder` takes the prompts of runs laid out alike as one stack), the test set's features and
pass. What stays each run's own: its context, optimiser and schedule, its few-shot images, and its
random stream, which is exactly the stream of the run trained alone (src/training.py): torch's
global generator seeded with its seed, after building CLIP (whose construction draws too), drawn by
its context's initialisation and then only by its own data order and augmentations. Each run keeps
that generator state (`RandomStream`) and it is swapped in around everything that draws for the run,
so on the CPU a packed run sees the same batches as alone, bit for bit, and ends with the same
context to float rounding (the shared passes add and multiply in other orders).

Every run writes its own folder as a run trained alone does (results.json, prompt.pt, fewshot.json,
config.yaml, csv/metrics.csv, train.log and checkpoints/last.ckpt in Lightning's format), so a
packed run resumes alone and a run killed alone resumes in a pack. Which runs pack together is the
sweep's business (src/pack_jobs.py).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from lightning_fabric.utilities.seed import pl_worker_init_function
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import CombinedLoader
from torch import nn
from torch.utils.data import DataLoader, Dataset

from src.callbacks import NonFiniteLossError, StopOnNonFiniteLoss
from src.files import save_torch
from src.methods.base import Method, build_method
from src.models.clip import FrozenCLIP
from src.pack_jobs import check_pack, logging_to, member_configs
from src.precheck import CheckedRun, check_training_run
from src.quiet import silence_known_warnings
from src.resume import RandomState, prepare_run_dir, read_checkpoint
from src.training import (
    describe_backbone,
    describe_devices,
    finished_run,
    run_results,
    write_config,
    write_results,
    zeroshot_baseline,
)

log = logging.getLogger(__name__)


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
        if random_state is not None:  # as Lightning restores it for the run alone (src/resume.py)
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


def packed_losses(
    clip: FrozenCLIP,
    modules: list[Method],
    keys: list[tuple],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
) -> list[torch.Tensor]:
    """Each run's training loss on its batch (CoOp's training step), the runs' images through the
    image encoder in one pass and their prompts through the text encoder in one pass per stack."""
    inputs = [images for images, _ in batches]
    if inputs[0].ndim == 2:  # cached image features
        image_features = inputs
    else:
        image_features = clip.image_features(torch.cat(inputs)).split([len(x) for x in inputs])
    text_features = packed_text_features(clip, modules, keys)
    return [
        module.loss(module.logits(image, text), labels)
        for module, image, text, (_, labels) in zip(
            modules, image_features, text_features, batches, strict=True
        )
    ]


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

    def setup(self, stage: str) -> None:
        for run in self.runs:  # features are computed with this module's CLIP, on its device
            run.datamodule.trainer = self.trainer

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
        losses = packed_losses(
            self.clip,
            [self.runs[i].module for i in active],
            [self.keys[i] for i in active],
            [batch[i] for i in active],
        )
        self.manual_backward(torch.stack(losses).sum())  # each run's context gets its own loss's gradient
        for i, loss in zip(active, losses, strict=True):
            run = self.runs[i]
            optimizers[i].step()
            optimizers[i].zero_grad()
            if run.stop_on_non_finite:  # as StopOnNonFiniteLoss: every step on a CPU, else at log steps
                finite = torch.isfinite(loss.detach())
                run.finite = finite if run.finite is None else run.finite & finite
                if self.device.type == "cpu" or self._logs_now(run):
                    self._stop_if_non_finite(run)
            if self._logs_now(run) and run.failed is None:
                run.log_metrics({"train/loss": loss.item(), "epoch": self.epoch}, step=run.steps)
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
            "method.module.lr"
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

    def _validate(self, runs: list[PackedRun]) -> None:
        """Each run's accuracy on its few-shot val set, logged as Lightning logs it for the run alone
        (at the epoch's last step); validation draws nothing from the runs' streams."""
        if self._val_loaders is None:
            self._val_loaders = {id(run): run.datamodule.val_dataloader() for run in self.runs}
        for run in runs:
            loader = self._val_loaders[id(run)]
            method = run.module
            method.on_validation_epoch_start()
            with torch.no_grad(), self.trainer.precision_plugin.forward_context():
                for images, labels in loader:
                    method.val_acc.update(method(images.to(self.device)), labels.to(self.device))
            method.on_validation_epoch_end()
            run.log_metrics(
                {"val/acc": method.val_acc.compute().item(), "epoch": self.epoch}, step=run.steps - 1
            )
            method.val_acc.reset()

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


def train_packed_job(cfg: DictConfig) -> list[dict[str, Any]]:
    """A multirun's job that holds a pack (`+packed_runs`, src/pack_jobs.py): its runs' configs,
    trained together, each run's folder getting the job's log."""
    cfgs = member_configs(cfg)
    with logging_to([Path(run.paths.output_dir) for run in cfgs]):
        return train_packed(cfgs)


def train_packed(cfgs: list[DictConfig]) -> list[dict[str, Any]]:
    """Trains the runs of `cfgs` (one method and data, seeds and contexts of their own; see
    src/pack_jobs.py) as one pack and writes each run's folder; returns their results, in order.
    Runs with results (`skip_done`) are not trained again."""
    silence_known_warnings()
    results: dict[int, dict[str, Any]] = {}
    pending = []
    for index, cfg in enumerate(cfgs):
        done = finished_run(cfg, Path(cfg.paths.output_dir))
        if done is None:
            pending.append(index)
        else:
            results[index] = done
    if pending:
        check_pack([cfgs[i] for i in pending])
        # every run's checks first, then the folders are claimed (fingerprint.json), as alone
        runs = [
            PackedRun(cfgs[i], check_training_run(cfgs[i], Path(cfgs[i].paths.output_dir))) for i in pending
        ]
        for run in runs:
            run.last = prepare_run_dir(run.cfg, run.out)
        clip = build_runs(runs)
        by_epoch: dict[int, list[int]] = defaultdict(list)
        for position, run in enumerate(runs):
            by_epoch[run.start_epoch].append(position)
        for first_epoch, positions in sorted(by_epoch.items()):
            trained = train_together(clip, [runs[p] for p in positions], first_epoch)
            for position, result in zip(positions, trained, strict=True):
                results[pending[position]] = result
        failed = [run.failed for run in runs if run.failed is not None]
        if failed:  # the others have their results: a relaunched sweep trains these only
            raise NonFiniteLossError(
                f"{len(failed)} of the pack's {len(cfgs)} runs stopped, the others finished: "
                + "; ".join(failed)
            )
    return [results[index] for index in range(len(cfgs))]


def build_runs(runs: list[PackedRun]) -> FrozenCLIP:
    """One CLIP for all runs; each run's method built, and its stream started, from the generator's
    state after building CLIP with its seed, as the run alone would (CLIP's construction draws
    from the stream even when it loads weights, so it is built once per seed; weights loaded from
    a file are the same for every seed, and runs of several seeds need them)."""
    seeds = list(dict.fromkeys(int(run.cfg.seed) for run in runs))
    if len(seeds) > 1 and runs[0].cfg.model.get("pretrained") is None:
        raise ValueError(
            f"model={runs[0].cfg.model.name} has random weights, which depend on the seed: runs of seeds "
            f"{seeds} cannot share it; pack runs of one seed (src/pack_jobs.py does)"
        )
    clip, states = None, {}
    for seed in seeds:
        pl.seed_everything(seed, workers=True)
        built = instantiate(runs[0].cfg.model)
        states[seed] = torch.get_rng_state()
        clip = clip or built
    for run in runs:
        run.datamodule.image_size = clip.image_size
        run.datamodule.setup("fit")  # the run's few-shot subsets (fewshot.json)
        run.stream = RandomStream(states[int(run.cfg.seed)])
        run.module = run.stream.drawing(build_method, run.cfg.method, clip, run.datamodule.classnames)
        optimization = run.module.optimization(run.max_epochs)
        run.optimizer = optimization["optimizer"]
        run.scheduler = optimization["lr_scheduler"]["scheduler"]
        if run.last is not None:
            log.info("%s: resuming from %s", run.out, run.last)
            run.restore(read_checkpoint(run.last))
    return clip


def train_together(
    clip: FrozenCLIP, runs: list[PackedRun], first_epoch: int
) -> list[dict[str, Any] | None]:
    """Fits runs that continue from the same epoch as one pack, tests them and writes their files;
    None for a run that stopped (`PackedRun.failed`)."""
    first = runs[0]
    epochs = first.max_epochs - first_epoch
    trainer: pl.Trainer = instantiate(
        first.cfg.trainer, max_epochs=epochs, logger=False, enable_checkpointing=False, callbacks=[]
    )
    log.info(
        "a pack of %d runs: %s with %s on %s",
        len(runs),
        first.cfg.method.name,
        describe_backbone(clip),
        describe_devices(trainer),
    )
    for run in runs:
        write_config(run.cfg, run.out)
        resolved = OmegaConf.to_container(run.cfg, resolve=True)
        for logger in run.loggers:
            logger.log_hyperparams(resolved)
            logger.log_hyperparams(run.module.hparams_initial)
    baseline = (
        zeroshot_baseline(first.cfg, clip, first.datamodule)
        if first.cfg.get("baseline") == "zeroshot"
        else None
    )
    pack = PackedRuns(clip, runs, first_epoch)
    start = time.perf_counter()
    if epochs > 0:
        trainer.fit(pack)
    train_time = (time.perf_counter() - start) / len(runs)  # each run's share of the pack's time
    trainer.test(pack, verbose=False)
    results = []
    for run, metrics in zip(runs, pack.test_metrics, strict=True):
        if run.failed is not None:  # no results.json: as alone, the run stopped
            results.append(None)
            continue
        result = run_results(
            run.cfg, run.module, run.datamodule, trainer, metrics, train_time, run.max_epochs, baseline
        )
        result["pack_size"] = len(runs)
        write_results(run.out, run.module, result)
        for logger in run.loggers:
            logger.finalize("success")
        results.append(result)
    return results

"""Continuing a killed run exactly where it stopped, and never with another configuration.

A run's folder is a function of its configuration (conf/train.yaml), so the same command finds its
own `checkpoints/last.ckpt` and continues from it. Three things make the continued run end exactly
like an uninterrupted one:

- the checkpoint also holds the random generators' states (`RandomState`), so the resumed epochs
  draw the same data order and augmentations (exact with `data.num_workers=0` or
  `data.persistent_workers=false`: persistent workers keep random states of their own);
- checkpoints are written to a temporary file beside the target and renamed (`AtomicCheckpointIO`):
  a kill during a write leaves the previous checkpoint, never a truncated one;
- the folder remembers the configuration it was started with (`fingerprint.json`); a
  later run there with another one stops with the keys that differ (`prepare_run_dir`) instead of
  mixing two recipes in one run. The file is created exclusively: of two runs started together in
  one folder, one claims it and the other compares with it.

A checkpoint that cannot be resumed from (truncated, holding pickled code, not this project's) stops
the run with one line naming it, before the folder is used (`check_run_dir`).

What a stopped run leaves for its continuation: SIGTERM (a preemption, a time limit) ends it with
exit status 143 and a line naming the checkpoint it continues from (`stopped_by_sigterm`); its logs
go on where the checkpoint left them (`ContinuedCSVLogger` keeps csv/metrics.csv's rows before it,
`ContinuedWandbLogger` logs into the same W&B run).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import pickle
import random
import re
import secrets
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException

from src.common.files import atomic_write, exclusive_write, save_torch, unwritable
from src.common.prompt_file import LAST_CHECKPOINT
from src.run.cli import Interrupted
from src.run.wandb_runs import WANDB_ID_FILE

FINGERPRINT = "fingerprint.json"

# Settings that change how a run goes, not what it computes: a run may continue with other values
# (fewer loader workers on another node, a progress bar, another logger). The `paths` group is
# compared with its values replaced by placeholders, so a moved data or output folder still resumes.
NOT_FINGERPRINTED = (
    "logger",
    # a method's recipe places: what they set is fingerprinted where it is read (data.*, trainer.*, ctx.*)
    "method.ctx",
    "method.data",
    "method.trainer",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "data.num_workers",
    "data.pin_memory",
    "data.persistent_workers",
    "data.test_batch_size",
    "data.cache_features",  # the cached features are the ones a run computes
    "model.cache_dir",
    "model.text_chunk",  # memory only: chunks are recomputed exactly
    "model.text_path",  # every path computes the same features (tests/test_exactness.py)
    "model.text_fast",
    "skip_done",
    "method.variant",  # the run folder's name
    "pack",  # trained alone or in a pack: the same run (src/packing/train.py)
    "pack_size",
    "seeds",  # a search's trial: the seeds it trains, each a run (src/run/search.py)
    "search",  # a search's trial or the test of the chosen one: the same run
)


class RunDirError(ValueError):
    """The run folder cannot be used: not writable, or it holds a run of another configuration."""


def prepare_run_dir(cfg: DictConfig, out: Path) -> Path | None:
    """Claims the run folder for this configuration (unless it is already this configuration's) and
    returns the checkpoint to continue from, if any.

    Raises RunDirError when `out` is not writable or holds (or was claimed a moment ago by) a run
    of another configuration.
    """
    _check_writable(out)
    text = json.dumps({"config": fingerprint(cfg)}, indent=2) + "\n"
    if not exclusive_write(out / FINGERPRINT, lambda f: f.write(text.encode())):
        _check_same_configuration(cfg, out)  # the folder's own, or the winner's of a concurrent start
    last = out / LAST_CHECKPOINT
    return last if last.exists() else None


def check_run_dir(cfg: DictConfig, out: Path, resuming: bool = True) -> None:
    """Raises RunDirError when `out` is not writable, holds a run of another configuration, or (when
    `resuming` from it) a checkpoint that cannot be resumed from."""
    _check_writable(out)
    if (out / FINGERPRINT).exists():
        _check_same_configuration(cfg, out)
    last = out / LAST_CHECKPOINT
    if resuming and last.exists():
        read_checkpoint(last)


def _check_same_configuration(cfg: DictConfig, out: Path) -> None:
    stored_file = out / FINGERPRINT
    try:
        stored = upgrade_fingerprint(json.loads(stored_file.read_text())["config"], fingerprint(cfg))
    except (ValueError, KeyError, TypeError) as err:
        raise RunDirError(
            f"{stored_file} is not a run's fingerprint ({type(err).__name__}): delete that folder to "
            "start again, or give this run its own folder with hydra.run.dir=<folder>"
        ) from err
    changed = differences(stored, fingerprint(cfg))
    if changed:
        raise RunDirError(
            f"{out} holds a run with another configuration ({changed}): delete that folder to "
            "start again, or give this run its own folder with hydra.run.dir=<folder>"
        )


def read_checkpoint(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """A run's Lightning checkpoint, read without unpickling code; RunDirError names the file and
    what to do when it cannot be resumed from (torch's own message would advise loading it with
    weights_only=False, which runs whatever code the file holds)."""
    fix = (
        "delete it to start the run over, or keep this folder as it is and give the run another one "
        "with hydra.run.dir=<folder>"
    )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except pickle.UnpicklingError as err:
        raise RunDirError(
            f"{path} holds more than tensors and plain data, which is not loaded (that could run "
            f"code): it is not a checkpoint of this project; {fix}"
        ) from err
    except Exception as err:  # torch raises many kinds for a truncated or foreign file
        raise RunDirError(f"{path} is damaged or not a checkpoint ({type(err).__name__}): {fix}") from err
    if not (isinstance(checkpoint, dict) and {"state_dict", "epoch"} <= checkpoint.keys()):
        raise RunDirError(f"{path} is not a Lightning checkpoint (no state_dict and epoch): {fix}")
    return checkpoint


# Folders started before the methods moved to src/methods/ (and their classes, not their configs,
# said whether they fit): the same configuration under its former names.
MOVED_METHODS = re.compile(
    r"^src\.models\.(coop|cocoop|kgcoop|prograd|maple|tip_adapter|tpt|linear_probe|zeroshot)\."
)
# Folders started before a run's machinery moved to src/run/: its callbacks' and plugins' targets.
MOVED_MACHINERY = re.compile(r"^src\.(resume|callbacks|cluster)\.")
FORMER_KEYS = ("method.fit", "method.zero_shot", "method.module.method")


# Folders started before the recipes moved into the method configs: the optimiser's and schedule's
# arguments were the constructor's (method.module.lr ...), their classes the method's own, and
# data.drop_last and trainer.max_steps were not keys unless a recipe set them.
FORMER_OPTIMISER = ("lr", "momentum", "weight_decay", "betas", "eps")
FORMER_SCHEDULE = ("warmup_epochs", "warmup_lr", "eta_min")
FORMER_RECIPE_KEYS = {
    **{f"method.module.{k}": f"method.optimizer.{k}" for k in FORMER_OPTIMISER},
    **{f"method.module.{k}": f"method.scheduler.{k}" for k in FORMER_SCHEDULE},
}
FORMER_DEFAULTS = {"data.drop_last": None, "trainer.max_steps": -1}


def upgrade_fingerprint(stored: dict[str, Any], current: dict[str, Any] | None = None) -> dict[str, Any]:
    """A stored fingerprint in today's names. One from before the recipes moved into the method
    configs takes the optimiser's and schedule's targets from `current` (the class's former, fixed
    choice is what its recipe now names: tests/test_recipes.py)."""
    upgraded = {key: _upgraded(value) for key, value in stored.items() if key not in FORMER_KEYS}
    if current is None or any(_under(k, "method.optimizer") for k in stored):
        return upgraded
    recipe = {k: v for k, v in current.items() if k.startswith(("method.optimizer.", "method.scheduler."))}
    for old, new in FORMER_RECIPE_KEYS.items():
        if old in upgraded and old not in current:  # (TPT's lr is still its own: a test-time step's)
            recipe[new] = upgraded.pop(old)
    return {**FORMER_DEFAULTS, **recipe, **upgraded}


def _upgraded(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    return MOVED_MACHINERY.sub(r"src.run.\1.", MOVED_METHODS.sub(r"src.methods.\1.", value))


def fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """The resolved configuration as flat `dotted.key: value` pairs, without NOT_FINGERPRINTED."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        for key in cfg.get("paths", {}):
            cfg.paths[key] = f"<paths.{key}>"
    flat = _flatten(OmegaConf.to_container(cfg, resolve=True))
    kept = {k: v for k, v in flat.items() if not any(_under(k, skip) for skip in NOT_FINGERPRINTED)}
    return json.loads(json.dumps(kept))  # as it reads back from the file: tuples become lists


def differences(stored: dict[str, Any], current: dict[str, Any], show: int = 5) -> str:
    """'key: old -> new, ...' for the keys whose values differ ('' when none do)."""
    keys = sorted(k for k in stored.keys() | current.keys() if stored.get(k, ...) != current.get(k, ...))
    parts = [f"{k}: {_show(stored, k)} -> {_show(current, k)}" for k in keys[:show]]
    if len(keys) > show:
        parts.append(f"and {len(keys) - show} more")
    return ", ".join(parts)


def _show(config: dict[str, Any], key: str) -> str:
    return json.dumps(config[key]) if key in config else "(unset)"


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: node}


def _check_writable(out: Path) -> None:
    reason = unwritable(out)
    if reason is not None:
        raise RunDirError(
            f"paths.output_dir={out} is not writable ({reason}): choose a writable folder "
            "with hydra.run.dir=<folder> (or paths.log_dir=<folder> for every run)"
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint files, written to a temporary file beside the target and renamed
    (Lightning's own writes the temporary file in /tmp, which on another file system becomes a copy
    onto the target), and read back without unpickling code."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        save_torch(path, checkpoint)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        return read_checkpoint(Path(path), map_location or "cpu")


class RandomState(pl.Callback):
    """Saves the random generators' states with every checkpoint and restores them on resume.

    Lightning restores the model, optimiser, schedule and epoch but not these, and the data order
    and augmentations of the epochs after a resume would otherwise differ from an uninterrupted run.
    """

    def state_dict(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        if len(state.get("cuda", [])) == torch.cuda.device_count() > 0:  # the same GPUs as before
            torch.cuda.set_rng_state_all(state["cuda"])


class PeriodicCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint every `every_n_epochs` epochs, and after the last epoch too.

    Writing a checkpoint every epoch costs more than the epoch itself in a small few-shot run (one
    or two steps per epoch); a resumed run replays the epochs since the last checkpoint exactly
    (the random generators' states are in it), so a longer interval loses time, never exactness.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._interval = self._every_n_epochs  # as configured (the last epoch sets 1 for its save)

    @property
    def state_key(self) -> str:
        # Lightning's key, by the configured interval also in the last epoch's checkpoint: a run
        # resumed from that one (a search's chosen trial, a run killed before its results) finds
        # its callback's state under the same key, and Lightning does not warn it is missing.
        return self._generate_state_key(
            monitor=self.monitor,
            mode=self.mode,
            every_n_train_steps=self._every_n_train_steps,
            every_n_epochs=self._interval,
            train_time_interval=self._train_time_interval,
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        every = self._every_n_epochs
        if _last_epoch(trainer) and every >= 1:
            self._every_n_epochs = 1
        try:
            super().on_train_epoch_end(trainer, pl_module)
        finally:
            self._every_n_epochs = every


def _last_epoch(trainer: pl.Trainer) -> bool:
    """Whether the epoch that ends is the run's last: by its epochs, or by its steps (a recipe that
    counts iterations, as method=clip_lora's, runs max_epochs=-1 and stops within an epoch)."""
    max_epochs = trainer.max_epochs or 0
    by_epochs = 0 < max_epochs <= trainer.current_epoch + 1
    return by_epochs or 0 < trainer.max_steps <= trainer.global_step


class ContinuedCSVLogger(CSVLogger):
    """Lightning's CSV log (csv/metrics.csv) that a resumed run continues: the rows logged before
    the checkpoint it continues from are kept, and those logged after it, which the resumed run
    logs again, are dropped (Lightning's own logger deletes the file, and says so, when it starts
    in a folder that has one). `continue_from(step)` is called before the log is first written;
    the rows are written with every checkpoint, so a killed run keeps those its checkpoint covers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._kept_before = 0

    def continue_from(self, step: int) -> None:
        """Keep the rows of the optimiser steps before `step` (the checkpoint's `global_step`)."""
        self._kept_before = step

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        # The rows a checkpoint covers are on disk with it, also if the run is killed after it.
        self.save()

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is not None:
            return self._experiment
        path = Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE
        kept, keys = self._rows_before(path)
        with warnings.catch_warnings():  # it is not deleted: its rows before the checkpoint stay
            warnings.filterwarnings("ignore", message="Experiment logs directory")
            writer = super().experiment
        if kept:
            writer.metrics_keys = sorted(keys)
            text = io.StringIO()
            table = csv.DictWriter(text, fieldnames=writer.metrics_keys)
            table.writeheader()
            table.writerows(kept)
            atomic_write(path, lambda f: f.write(text.getvalue().encode()))
        return writer

    def _rows_before(self, path: Path) -> tuple[list[dict[str, str]], list[str]]:
        if not self._kept_before or not path.is_file():
            return [], []
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            rows = [row for row in reader if row.get("step") and float(row["step"]) < self._kept_before]
            return rows, list(reader.fieldnames or [])


def continue_logs(loggers: list[Logger], step: int) -> None:
    """The run's logs go on from the optimiser step of the checkpoint it continues from (0: a new
    run)."""
    for logger in loggers:
        if isinstance(logger, ContinuedCSVLogger):
            logger.continue_from(step)


@contextmanager
def stopped_by_sigterm(*folders: Path) -> Iterator[None]:
    """Turns Lightning's exit on SIGTERM (a SystemExit with status 0, no results) into `Interrupted`,
    naming the checkpoint the same command continues from (of each run of a pack)."""
    try:
        yield
    except SIGTERMException as err:
        lines = []
        for out in folders:
            last = out / LAST_CHECKPOINT
            epoch = checkpoint_epoch(last)
            where = (
                f"its checkpoint {last} holds epoch {epoch + 1}; the same command continues from it"
                if epoch is not None
                else "no checkpoint was written yet; the same command starts the run again"
            )
            lines.append(f"{out}: stopped by SIGTERM (a preemption or a time limit): {where}")
        raise Interrupted("\n".join(lines)) from err


def checkpoint_epoch(path: Path) -> int | None:
    """The epoch (0-based) a run's checkpoint ends, None when there is none to read."""
    try:
        return int(read_checkpoint(path)["epoch"]) if path.is_file() else None
    except (RunDirError, KeyError, TypeError, ValueError):
        return None


class ContinuedWandbLogger(WandbLogger):
    """Lightning's W&B logger, whose W&B run a resumed run continues: the run's W&B id is kept in its
    folder (`wandb_run_id`, written when the W&B run starts), so the same command logs into the
    same W&B run (`resume="allow"`), which keeps what was logged before the interruption (W&B keeps
    the first value of a step the resumed run logs again); a run in a new or emptied folder gets a
    new id."""

    ID_FILE = WANDB_ID_FILE

    def __init__(self, *args: Any, save_dir: str | Path | None = None, **kwargs: Any) -> None:
        self._id_file = Path(save_dir) / self.ID_FILE if save_dir is not None else None
        if self._id_file is not None and kwargs.get("id") is None and kwargs.get("version") is None:
            kwargs["id"] = (
                self._id_file.read_text().strip() if self._id_file.is_file() else secrets.token_hex(4)
            )
        super().__init__(*args, save_dir=save_dir, **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is None and self._id_file is not None and not self._id_file.is_file():
            run_id = self._wandb_init["id"]
            atomic_write(self._id_file, lambda f: f.write(f"{run_id}\n".encode()))
        return super().experiment

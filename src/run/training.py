"""A training run: fit a method on the k-shot train set, test the last model, write the run's files
(results.json, prompt.pt, fewshot.json, config.yaml, metrics). The command is src/train.py."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities.model_helpers import is_overridden

import src.run.config  # noqa: F401  (the resolvers of conf/)
from src.common.files import atomic_write, save_torch, write_json
from src.common.prompt_file import PROMPT_FILE
from src.data.datamodule import FewShotDataModule
from src.methods.base import Method, build_method
from src.methods.zeroshot import ZeroShotCLIP
from src.models.clip import FrozenCLIP
from src.run.backbone import build_backbone, describe_backbone, describe_devices
from src.run.checks import check_training_run
from src.run.logs import silence_known_warnings
from src.run.results import evaluation_fields, method_fields
from src.run.resume import (
    check_run_dir,
    continue_logs,
    prepare_run_dir,
    read_checkpoint,
    stopped_by_sigterm,
)

log = logging.getLogger(__name__)

VALIDATION_FILE = "validation.json"  # a run validated instead of tested (train(cfg, test=False))


def train(cfg: DictConfig, test: bool = True) -> dict[str, Any]:
    """Fits the method on the k-shot train set, tests the last model, writes the run's files.

    `test=False` (a trial of a hyper-parameter search, src/run/search.py): the last model is
    validated instead, on the few-shot validation split, and the test split is never read; the run
    keeps its checkpoint and writes validation.json, not results.json, so that the same run with
    `test=True` continues from its last epoch to the test alone."""
    silence_known_warnings()
    out = Path(cfg.paths.output_dir)
    done = finished_run(cfg, out) if test else finished_validation(cfg, out)
    if done is not None:
        return done
    # Every mistake at once, before the folder is claimed (the corrected command runs there) and
    # before the slow weights load.
    checked = check_training_run(cfg, out)
    datamodule, trainer = checked.datamodule, checked.trainer
    last = prepare_run_dir(cfg, out)  # the folder remembers this configuration
    step = read_checkpoint(last)["global_step"] if last is not None else 0
    if test and last is not None and (out / VALIDATION_FILE).exists():
        step += 1  # validated after its last checkpoint (test=False), which this run does not repeat
    continue_logs(trainer.loggers, step)
    clip = build_backbone(cfg, datamodule, trainer)
    module = build_method(cfg.method, clip, datamodule.classnames)
    if not test and not is_overridden("validation_step", module):
        raise ValueError(
            f"method={cfg.method.name} validates nothing (it has no validation_step): a search scores "
            "its trials by validation accuracy; search a method that validates"
        )
    log.info("%s with %s on %s", cfg.method.name, describe_backbone(clip), describe_devices(trainer))
    if trainer.is_global_zero:
        write_config(cfg, out)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved)

    baseline = None
    if cfg.get("baseline") == "zeroshot" and test:  # a test, measured with the run's own
        baseline = zeroshot_baseline(cfg, clip, datamodule)
    if last is not None:
        log.info("resuming from %s", last)
    start = time.perf_counter()
    with stopped_by_sigterm(out):
        if module.trains:
            trainer.fit(module, datamodule=datamodule, ckpt_path=last)
        train_time = time.perf_counter() - start
        evaluate = trainer.test if test else trainer.validate
        (metrics,) = evaluate(module, datamodule=datamodule, verbose=False)

    if test:
        epochs = trainer.max_epochs if module.trains else 0
        results = run_results(cfg, module, datamodule, trainer, metrics, train_time, epochs, baseline)
        if trainer.is_global_zero:
            write_results(out, module, results)
    else:
        results = validation_results(
            cfg, datamodule, metrics, train_time, out, trainer.max_epochs, trainer.is_global_zero
        )
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            # The next run of a sweep in this process gets its own W&B run, not this one.
            logger.experiment.finish()
    return results


def finished_run(cfg: DictConfig, out: Path) -> dict[str, Any] | None:
    """The results of the run in `out` if it has finished and `skip_done` is on, else None."""
    done = out / "results.json"
    if not (cfg.get("skip_done", False) and done.exists()):
        return None
    # A re-launched sweep runs only what is missing (results.json is written last, atomically).
    check_run_dir(cfg, out, resuming=False)  # the results of this configuration
    log.info("%s exists: skipping this run (skip_done=false runs it again)", done)
    return json.loads(done.read_text())


def finished_validation(cfg: DictConfig, out: Path) -> dict[str, Any] | None:
    """The validation of the run in `out` (`train(cfg, test=False)`) if it has been written and
    `skip_done` is on, else None."""
    done = out / VALIDATION_FILE
    if not (cfg.get("skip_done", False) and done.exists()):
        return None
    check_run_dir(cfg, out, resuming=False)
    log.info("%s exists: skipping this run (skip_done=false runs it again)", done)
    return json.loads(done.read_text())


def validation_results(
    cfg: DictConfig,
    datamodule: FewShotDataModule,
    metrics: dict[str, float],
    train_time: float,
    out: Path,
    epochs: int,
    write: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """validation.json of a run validated, not tested (written where `write`: the main process):
    the last model's accuracy (percent) on the few-shot validation split after `epochs` epochs."""
    results = {
        "dataset": cfg.dataset.name,
        "subsample": cfg.dataset.subsample,
        "method": cfg.method.name,
        "shots": cfg.shots,
        "seed": cfg.seed,
        "val_acc": 100 * metrics["val/acc"],
        "num_val": len(datamodule.val_items),
        "epochs": epochs,
        "train_time_s": round(train_time, 3),
        **extra,
    }
    if write:
        write_json(out / VALIDATION_FILE, results)
    log.info("validation accuracy %.2f%% (%d images); in %s", results["val_acc"], results["num_val"], out)
    return results


def write_config(cfg: DictConfig, out: Path) -> None:
    text = OmegaConf.to_yaml(cfg, resolve=True)
    atomic_write(out / "config.yaml", lambda f: f.write(text.encode()))


def run_results(
    cfg: DictConfig,
    module: Method,
    datamodule: FewShotDataModule,
    trainer: pl.Trainer,
    metrics: dict[str, float],
    train_time: float,
    epochs: int,
    baseline: float | None,
) -> dict[str, Any]:
    """results.json of a run: its test metrics and every setting that changes them."""
    results = {
        "dataset": cfg.dataset.name,
        "subsample": cfg.dataset.subsample,
        "shots": cfg.shots,
        "seed": cfg.seed,
        **evaluation_fields(module.clip, datamodule, trainer, metrics),
        "num_train": len(datamodule.train_items),
        "fewshot_sampler": datamodule.fewshot_origin["sampler"],
        "fewshot_source": datamodule.fewshot_origin["source"],  # None: drawn by this run
        "train_time_s": round(train_time, 3),
        "epochs": epochs,
        "train_views": cfg.data.train_views,
        "label_noise": datamodule.label_noise,
        "noisy_labels": len(datamodule.flipped),
        **method_fields(module),  # the method's name, kind and own fields (it may set any above)
    }
    if baseline is not None:
        results.update(zeroshot_acc=baseline, gain=results["test_acc"] - baseline)
        log.info(
            "zero-shot CLIP (%r) %.2f%%, %s %.2f%%: %+.2f points",
            cfg.dataset.template,
            baseline,
            cfg.method.name,
            results["test_acc"],
            results["gain"],
        )
    return results


def write_results(out: Path, module: Method, results: dict[str, Any]) -> None:
    """prompt.pt (a method with something to save), then results.json: a run is done once it exists."""
    prompt = module.prompt_state()
    if prompt is not None:
        save_torch(out / PROMPT_FILE, prompt)
    write_json(out / "results.json", results)
    log.info("test accuracy %.2f%% (%d images); results in %s", results["test_acc"], results["num_test"], out)


def zeroshot_baseline(cfg: DictConfig, clip: FrozenCLIP, datamodule: FewShotDataModule) -> float:
    """Test accuracy (percent) of zero-shot CLIP with the dataset's hand-made template, on the test
    set the method is tested on: the baseline a learned prompt has to beat (`baseline=zeroshot`).
    The data module has the run's image encoder already (`build_backbone`)."""
    module = ZeroShotCLIP(clip, datamodule.classnames, [cfg.dataset.template])
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    (metrics,) = trainer.test(module, datamodule=datamodule, verbose=False)
    log.info("zero-shot CLIP with %r: test accuracy %.2f%%", cfg.dataset.template, 100 * metrics["test/acc"])
    return 100 * metrics["test/acc"]

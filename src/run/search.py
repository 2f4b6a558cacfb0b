"""The jobs of a hyper-parameter search (`python -m src.train -m hparams_search=<name>`; the sweeper
is hydra_plugins/coop_optuna_sweeper): a trial, and the test of the chosen trial.

A trial trains its setting once per seed (`seeds=1,2,3`; `seed` alone by default; with `pack=true`,
its seeds as one pack), each run in its own folder `<trial folder>/seed<S>/`, validates each run's
last model on the few-shot validation split and returns the mean of their accuracies: the trial's
score. It never reads the test split.
The search's last job (`search.chosen=<that trial's folder>`) runs the chosen trial's runs again:
each continues from its last checkpoint, with nothing left to train, and is tested, so that it
ends as the run of that setting launched alone would (results.json).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from src.run.training import train

log = logging.getLogger(__name__)


class SearchError(ValueError):
    """A search that cannot run as given: names the option and what to do."""


def is_search_job(cfg: DictConfig) -> bool:
    """Whether `cfg` is a job of a hyper-parameter search (an hparams_search config, or the
    sweeper's `search.chosen`)."""
    return cfg.get("search") is not None


# Trains runs of one setting and several seeds as one pack: src/packing/train.py's train_packed,
# given by src/train.py (the packing package sits above this one).
PackTrainer = Callable[..., list[dict[str, Any]]]


def search_job(cfg: DictConfig, train_packed: PackTrainer | None = None) -> dict[str, Any]:
    """A trial (`search.chosen` unset): {"val_acc": the mean over seeds, "val_accs": {seed: acc},
    "dir": the trial's folder}; the test of a chosen trial: {"test_acc", "test_accs", "runs"}.
    `train_packed`: how a trial's seeds train as one pack (with `pack=true`)."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.RUN:
        raise SearchError(
            "an hparams_search config is a search of many runs: launch it as a multirun, "
            "python -m src.train -m hparams_search=<name> ..."
        )
    seeds = trial_seeds(cfg)
    if cfg.search.get("chosen") is None:
        return run_trial(cfg, seeds, Path(cfg.paths.output_dir), train_packed)
    return test_trial(cfg, seeds, Path(cfg.search.chosen))


def trial_seeds(cfg: DictConfig) -> list[int]:
    """The seeds of a trial: `seeds`, else `seed` alone."""
    seeds = cfg.get("seeds")
    return [int(cfg.seed)] if seeds is None else [int(seed) for seed in seeds]


def seed_run(cfg: DictConfig, seed: int, folder: Path) -> DictConfig:
    """The config of a trial's run of one seed, in its own folder."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.seed = seed
        cfg.paths.output_dir = str(folder)
    return cfg


def run_trial(
    cfg: DictConfig, seeds: list[int], folder: Path, train_packed: PackTrainer | None = None
) -> dict[str, Any]:
    """Trains and validates the trial's runs: with `pack=true`, its seeds as one pack (one frozen
    CLIP, each run's folder and validation as alone: docs/packing.md), else one after another."""
    runs = [seed_run(cfg, seed, folder / f"seed{seed}") for seed in seeds]
    if cfg.get("pack") and len(runs) > 1 and train_packed is not None:
        validated = train_packed(runs, test=False)
    else:
        validated = [train(run, test=False) for run in runs]
    accs = {str(seed): result["val_acc"] for seed, result in zip(seeds, validated, strict=True)}
    mean = sum(accs.values()) / len(accs)
    if len(seeds) > 1:
        log.info("trial's validation accuracy: %.2f%% (mean over seeds %s)", mean, ", ".join(accs))
    return {"val_acc": mean, "val_accs": accs, "dir": str(folder.resolve())}


def test_trial(cfg: DictConfig, seeds: list[int], folder: Path) -> dict[str, Any]:
    runs = [folder / f"seed{seed}" for seed in seeds]
    missing = [str(run) for run in runs if not run.is_dir()]
    if missing:
        raise SearchError(f"search.chosen={folder}: no run {', '.join(missing)}; give a trial's folder")
    accs = {}
    for seed, run in zip(seeds, runs, strict=True):
        accs[str(seed)] = train(seed_run(cfg, seed, run))["test_acc"]
    mean = sum(accs.values()) / len(accs)
    log.info("the chosen setting's test accuracy: %.2f%% (seeds %s)", mean, ", ".join(accs))
    return {"test_acc": mean, "test_accs": accs, "runs": [str(run.resolve()) for run in runs]}

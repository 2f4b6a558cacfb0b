"""Train a method on few labelled images and test it.

python -m src.train dataset=oxford_pets ctx=class_specific shots=8
python -m src.train experiment=quickstart          # offline: zero-shot, then CoOp, on digits
python -m src.train -m hparams_search=coop_optuna experiment=quickstart   # a search (src/run/search.py)
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from src.packing.jobs import PACKED_RUNS
from src.packing.train import train_packed, train_packed_job
from src.run.cli import run, task
from src.run.config import as_hydra_overrides
from src.run.search import is_search_job, search_job
from src.run.training import train


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@task
def main(cfg: DictConfig) -> float | list[float] | dict:
    if PACKED_RUNS in cfg:  # a pack of a multirun's runs (pack=true)
        return [results["test_acc"] for results in train_packed_job(cfg)]
    if is_search_job(cfg):  # a trial of a hyper-parameter search, or the chosen one's test
        return search_job(cfg, train_packed)
    return train(cfg)["test_acc"]


if __name__ == "__main__":
    sys.argv = as_hydra_overrides(sys.argv)
    run(main)

"""Evaluate a saved prompt on any dataset's test split.

python -m src.eval ckpt=outputs/imagenet/coop/.../prompt.pt dataset=imagenetv2
python -m src.eval ckpt=outputs/oxford_pets_base/.../prompt.pt dataset=oxford_pets dataset.subsample=new
python -m src.eval ckpt=[.../seed1/prompt.pt,.../seed2/prompt.pt] ensemble=features dataset=dtd

`ckpt=` is a training run's folder, its prompt.pt or its checkpoints/last.ckpt (an unfinished run);
results go to eval/<dataset>/ in that run folder (src/run/evaluation.py).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from src.run.cli import run, task
from src.run.evaluation import evaluate


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
@task
def main(cfg: DictConfig) -> float:
    return evaluate(cfg)["test_acc"]


if __name__ == "__main__":
    run(main)

"""Train a prompt on few labelled images and test it.

python -m src.train dataset=oxford_pets ctx=class_specific shots=8
python -m src.train experiment=quickstart          # offline, tiny model, textile photos
"""

from __future__ import annotations

import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.data.transforms import describe
from src.files import atomic_write, save_torch, write_json

log = logging.getLogger(__name__)


def default_precision() -> str:
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


OmegaConf.register_new_resolver("default_precision", default_precision, replace=True)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fits the method on the k-shot train set, tests the last model, writes the run's files."""
    out = Path(cfg.paths.output_dir)
    pl.seed_everything(cfg.seed, workers=True)
    clip = instantiate(cfg.model)
    datamodule = instantiate(cfg.data, dataset=instantiate(cfg.dataset.reader), image_size=clip.image_size)
    module = instantiate(cfg.method.module, clip=clip, classnames=datamodule.classnames)
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        callbacks=[instantiate(c) for c in cfg.get("callbacks", {}).values()],
        logger=[instantiate(c) for c in cfg.get("logger", {}).values()],
    )
    if trainer.is_global_zero:
        text = OmegaConf.to_yaml(cfg, resolve=True)
        atomic_write(out / "config.yaml", lambda f: f.write(text.encode()))

    last = out / "checkpoints" / "last.ckpt"
    if last.exists():
        log.info("resuming from %s", last)
    start = time.perf_counter()
    if cfg.method.fit:
        trainer.fit(module, datamodule=datamodule, ckpt_path=last if last.exists() else None)
    train_time = time.perf_counter() - start
    (metrics,) = trainer.test(module, datamodule=datamodule, verbose=False)

    results = {
        "dataset": cfg.dataset.name,
        "method": cfg.method.name,
        "shots": cfg.shots,
        "seed": cfg.seed,
        "ctx": cfg.ctx.name,
        "n_ctx": module.prompt_learner.n_ctx,
        "ctx_init": cfg.ctx.init,
        "class_token_position": cfg.ctx.class_token_position,
        "backbone": clip.name,
        "pretrained": clip.pretrained,
        "test_acc": 100 * metrics["test/acc"],
        "test_macro_acc": 100 * metrics["test/macro_acc"],
        "num_test": len(datamodule.test_items),
        "num_train": len(datamodule.train_items),
        "num_classes": len(datamodule.classnames),
        "train_time_s": round(train_time, 3),
        "epochs": trainer.max_epochs,
        "precision": str(trainer.precision),
        "image_size": clip.image_size,
        "transforms": describe(clip.image_size),
        "text_fast": clip.text.fast,
    }
    if trainer.is_global_zero:
        if hasattr(module, "prompt_state"):
            save_torch(out / "prompt.pt", module.prompt_state())
        write_json(out / "results.json", results)
        log.info(
            "test accuracy %.2f%% (%d images); results in %s", results["test_acc"], results["num_test"], out
        )
    return results


# Config groups whose options are numbers (conf/shots/8.yaml). Hydra parses `shots=8` as an integer
# and refuses integers as group choices, so the command line's numbers are quoted before parsing.
NUMERIC_GROUPS = ("shots",)


def quote_numeric_choices(args: list[str]) -> list[str]:
    """`shots=8` -> `shots='8'`, `shots=1,2,4` -> `shots='1','2','4'` (for sweeps)."""
    pattern = re.compile(rf"^((?:\+|~)?(?:{'|'.join(NUMERIC_GROUPS)}))=(\d+(?:,\d+)*)$")
    quoted = []
    for arg in args:
        match = pattern.match(arg)
        if match:
            arg = f"{match[1]}=" + ",".join(f"'{v}'" for v in match[2].split(","))
        quoted.append(arg)
    return quoted


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return train(cfg)["test_acc"]


if __name__ == "__main__":
    sys.argv = quote_numeric_choices(sys.argv)
    main()

"""Evaluate a saved prompt on any dataset's test split.

python -m src.eval ckpt=outputs/imagenet/coop/.../prompt.pt dataset=imagenetv2
python -m src.eval ckpt=outputs/oxford_pets_base/.../prompt.pt dataset=oxford_pets dataset.subsample=new

The backbone is the one the prompt was learned on. A unified context is rebuilt on the dataset's
class names (other classes: domain generalisation, cross-dataset, new classes); a class-specific
one only exists for the classes it was trained on.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import src.train  # noqa: F401  (registers the resolvers that conf/ uses)
from src.cli import run
from src.files import write_json
from src.models.clip import FrozenCLIP
from src.models.cocoop import cocoop_from_prompt
from src.models.coop import CoOp, coop_from_prompt, load_prompt
from src.models.maple import maple_from_prompt
from src.results import evaluation_fields

log = logging.getLogger(__name__)

# How each method's prompt file is turned back into its module (prompt_state()["method"]).
PROMPT_LOADERS = {"coop": coop_from_prompt, "cocoop": cocoop_from_prompt, "maple": maple_from_prompt}
# Methods whose prompts change the image features: they are tested on images, never cached features.
IMAGE_PROMPTED = ("maple",)


def read_prompt(path: str | Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise ValueError(f"ckpt={path}: no such file; give the prompt.pt written by a training run")
    return load_prompt(path)


def prompt_field(path: str, field: str) -> Any:
    """A field of a prompt file, for the config (model=from_ckpt reads the backbone from it)."""
    return read_prompt(path)[field]


OmegaConf.register_new_resolver("prompt_field", prompt_field, use_cache=True, replace=True)
OmegaConf.register_new_resolver("dirname", lambda path: str(Path(path).parent), replace=True)


def module_from_prompt(state: dict[str, Any], clip: FrozenCLIP, classnames: list[str]) -> CoOp:
    return PROMPT_LOADERS[state.get("method", "coop")](state, clip, classnames)


def training_results(ckpt: str | Path) -> dict[str, Any]:
    """The results.json of the run that wrote the prompt file, if it sits beside it."""
    path = Path(ckpt).parent / "results.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Tests the prompt file `cfg.ckpt` on the test split of `cfg.dataset`; writes results.json."""
    out = Path(cfg.paths.output_dir)
    state = read_prompt(cfg.ckpt)
    pl.seed_everything(cfg.seed, workers=True)
    clip = instantiate(cfg.model)
    datamodule = instantiate(
        cfg.data,
        dataset=instantiate(cfg.dataset.reader),
        image_size=clip.image_size,
        cache_features=cfg.data.cache_features and state.get("method") not in IMAGE_PROMPTED,
    )
    module = module_from_prompt(state, clip, datamodule.classnames)
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    (metrics,) = trainer.test(module, datamodule=datamodule, verbose=False)

    source = training_results(cfg.ckpt)
    results = {
        "dataset": cfg.dataset.name,
        "subsample": cfg.dataset.subsample,
        "method": state.get("method", "coop"),
        "ckpt": str(cfg.ckpt),
        "trained_on": source.get("dataset"),
        "trained_subsample": source.get("subsample"),
        "shots": source.get("shots"),
        "seed": source.get("seed"),
        "ctx": "class_specific" if state["class_specific"] else "unified",
        "n_ctx": state["n_ctx"],
        "ctx_init": state.get("ctx_init"),
        "class_token_position": state["class_token_position"],
        **evaluation_fields(clip, datamodule, trainer, metrics),
    }
    if trainer.is_global_zero:
        write_json(out / "results.json", results)
        log.info("%s: test accuracy %.2f%%; results in %s", cfg.dataset.name, results["test_acc"], out)
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    return evaluate(cfg)["test_acc"]


if __name__ == "__main__":
    run(main)

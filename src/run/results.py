"""results.json: the fields every run shares, whether it trained a method or evaluated a saved one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from src.common.prompt_file import run_folder
from src.data.datamodule import FewShotDataModule
from src.methods.base import Method
from src.models.clip import FrozenCLIP


def method_fields(module: Method) -> dict[str, Any]:
    """The method: its name, what the contract says of it (src.report reads these), and the fields
    it adds (a learned context's settings, its own hyper-parameters)."""
    return {"method": module.name, **module.contract_fields(), **module.result_fields()}


def evaluation_fields(
    clip: FrozenCLIP, datamodule: FewShotDataModule, trainer: pl.Trainer, metrics: dict[str, float]
) -> dict[str, Any]:
    """The test's accuracies (percent) and every setting that changes them."""
    return {
        "backbone": clip.name,
        "pretrained": clip.pretrained,
        "test_acc": 100 * metrics["test/acc"],
        "test_macro_acc": 100 * metrics["test/macro_acc"],
        "num_test": len(datamodule.test_items),
        "num_classes": len(datamodule.classnames),
        "precision": str(trainer.precision),
        "image_size": clip.image_size,
        "transforms": datamodule.describe(),
        "text_path": clip.text.resolved_path(trainer.strategy.root_device),
    }


def training_results(ckpt: str | Path) -> dict[str, Any]:
    """The results.json of the run that wrote a prompt, if it has one (a finished run)."""
    path = run_folder(ckpt) / "results.json"
    return json.loads(path.read_text()) if path.is_file() else {}

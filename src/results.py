"""The fields every results.json shares, whether a run trained a prompt or evaluated one."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from src.data.datamodule import FewShotDataModule
from src.models.clip import FrozenCLIP


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

"""What the methods without gradient training share: a classifier of frozen CLIP image features,
tested like CoOp (top-1 and macro accuracy) on images or on cached image features."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from src.models.accuracy_test import AccuracyTest
from src.models.clip import FrozenCLIP


class FrozenClassifier(AccuracyTest, pl.LightningModule):
    """Subclasses give `logits(image_features)`; nothing here has gradients."""

    def __init__(self, clip: FrozenCLIP, classnames: list[str]) -> None:
        super().__init__()
        self.clip = clip
        self.classnames = list(classnames)
        self.init_test_metrics(len(classnames))

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of images [b, 3, h, w] or of their image features [b, d]."""
        features = self.clip.image_features(images)
        return self.logits(features)

    def result_fields(self) -> dict:
        # No learned context and no training epochs: CoOp's fields of those do not apply.
        return {
            "ctx": None,
            "n_ctx": None,
            "ctx_init": None,
            "ctx_init_count": None,
            "class_token_position": None,
            "epochs": 0,
        }

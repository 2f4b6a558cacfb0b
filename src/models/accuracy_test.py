"""The test of every method: top-1 accuracy over all test images (the paper's number) and mean
per-class accuracy, synced across devices by torchmetrics."""

from __future__ import annotations

import torch
from torchmetrics.classification import MulticlassAccuracy


class AccuracyTest:
    """Mixin for a LightningModule whose forward gives class logits."""

    def init_test_metrics(self, num_classes: int) -> None:
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_macro_acc = MulticlassAccuracy(num_classes=num_classes, average="macro")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.test_acc(logits, labels)
        self.test_macro_acc(logits, labels)
        self.log("test/acc", self.test_acc, batch_size=len(labels))
        self.log("test/macro_acc", self.test_macro_acc, batch_size=len(labels))

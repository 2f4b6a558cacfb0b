"""What the methods without gradient training share: a classifier of frozen CLIP image features,
tested on images or on cached image features."""

from __future__ import annotations

import torch

from src.methods.base import Method


class FrozenClassifier(Method):
    """Subclasses give `logits(image_features)`; nothing here has gradients, and nothing trains
    before the test (what they fit, they fit at its start)."""

    trains = False

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of images [b, 3, h, w] or of their image features [b, d]."""
        features = self.clip.image_features(images)
        return self.logits(features)

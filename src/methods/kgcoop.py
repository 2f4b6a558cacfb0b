"""KgCoOp (Yao et al., "Visual-Language Prompt Tuning with Knowledge-guided Context Optimization",
CVPR 2023): CoOp whose class text features are kept near those of the hand-made prompt."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from src.methods.base import LossTerms
from src.methods.coop import CoOp, Features
from src.methods.zeroshot import HandMadeGuided
from src.models.clip import FrozenCLIP


class KgCoOp(HandMadeGuided, CoOp):
    """Loss = cross-entropy + `weight` * (1 - mean over classes of cos(w_i, w_i^clip)), w_i the
    learned and w_i^clip the hand-made prompt's (`template`) text feature of class i.

    For unit vectors 1 - cos = ||w_i - w_i^clip||^2 / 2: this is the paper's squared distance
    halved, as the official code computes it, so the official weight 8.0 keeps its meaning.
    """

    name = "kgcoop"

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: list[str],
        template: str,
        weight: float = 8.0,
        n_ctx: int = 4,
        ctx_init: str | None = "a photo of a",
        **coop_args: Any,
    ) -> None:
        super().__init__(clip, classnames, n_ctx=n_ctx, ctx_init=ctx_init, **coop_args)
        self.template = template
        self.weight = weight

    def knowledge_distance(self, text_features: torch.Tensor) -> torch.Tensor:
        """1 - mean cosine between learned and hand-made class text features."""
        cos = F.cosine_similarity(text_features.float(), self.hand_made_features(), dim=-1, eps=1e-7)
        return 1 - cos.mean()

    def loss_terms(self, images: Tensor, labels: Tensor, features: Features | None = None) -> LossTerms:
        """CoOp's terms plus `kg`: `weight` x the knowledge distance of the class text features."""
        features = self.features(images) if features is None else features
        terms = super().loss_terms(images, labels, features)
        return {**terms, "kg": self.weight * self.knowledge_distance(features[1])}

    def result_fields(self) -> dict[str, Any]:
        return {**super().result_fields(), "kg_weight": self.weight, "template": self.template}

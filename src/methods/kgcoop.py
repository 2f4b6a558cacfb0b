"""KgCoOp (Yao et al., "Visual-Language Prompt Tuning with Knowledge-guided Context Optimization",
CVPR 2023): CoOp whose class text features are kept near those of the hand-made prompt."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from src.methods.coop import CoOp
from src.methods.zeroshot import HandMadeGuided
from src.models.clip import FrozenCLIP


class KgCoOp(HandMadeGuided, CoOp):
    """Loss = cross-entropy + `weight` * (1 - mean over classes of cos(w_i, w_i^clip)), w_i the
    learned and w_i^clip the hand-made prompt's (`template`) text feature of class i.

    For unit vectors 1 - cos = ||w_i - w_i^clip||^2 / 2: this is the paper's squared distance
    halved, as the official code computes it, so the official weight 8.0 keeps its meaning.
    """

    name = "kgcoop"
    packable = False  # its loss adds a term on its text features (training_step)

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
        self.check_template(template)
        super().__init__(clip, classnames, n_ctx=n_ctx, ctx_init=ctx_init, **coop_args)
        self.template = template
        self.weight = weight

    def knowledge_distance(self, text_features: torch.Tensor) -> torch.Tensor:
        """1 - mean cosine between learned and hand-made class text features."""
        cos = F.cosine_similarity(text_features.float(), self.hand_made_features(), dim=-1, eps=1e-7)
        return 1 - cos.mean()

    def regulariser(
        self, images: torch.Tensor, image_features: torch.Tensor, text_features: torch.Tensor
    ) -> torch.Tensor:
        return self.weight * self.knowledge_distance(text_features)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        features, text = self.features(images)
        ce = F.cross_entropy(self.logits(features, text), labels)
        regulariser = self.regulariser(images, features, text)
        loss = ce + regulariser
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        self.log("train/kg_loss", regulariser, batch_size=len(labels))
        return loss

    def result_fields(self) -> dict[str, Any]:
        return {**super().result_fields(), "kg_weight": self.weight, "template": self.template}

"""KgCoOp (Yao et al., "Visual-Language Prompt Tuning with Knowledge-guided Context Optimization",
CVPR 2023): CoOp whose class text features are kept near those of the hand-made prompt."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from src.models.clip import FrozenCLIP
from src.models.coop import CoOp
from src.models.prompt_learner import InitCount, Position
from src.models.zeroshot import HandMadeGuided


class KgCoOp(HandMadeGuided, CoOp):
    """Loss = cross-entropy + `weight` * (1 - mean over classes of cos(w_i, w_i^clip)), w_i the
    learned and w_i^clip the hand-made prompt's (`template`) text feature of class i.

    For unit vectors 1 - cos = ||w_i - w_i^clip||^2 / 2: this is the paper's squared distance
    halved, as the official code computes it, so the official weight 8.0 keeps its meaning.
    """

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: list[str],
        template: str,
        weight: float = 8.0,
        n_ctx: int = 4,
        ctx_init: str | None = "a photo of a",
        class_specific: bool = False,
        class_token_position: Position = "end",
        ctx_init_count: InitCount = "words",
        lr: float = 0.002,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        warmup_epochs: int = 1,
        warmup_lr: float = 1e-5,
    ) -> None:
        self.check_template(template)
        super().__init__(
            clip,
            classnames,
            n_ctx=n_ctx,
            ctx_init=ctx_init,
            class_specific=class_specific,
            class_token_position=class_token_position,
            ctx_init_count=ctx_init_count,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            warmup_epochs=warmup_epochs,
            warmup_lr=warmup_lr,
        )
        self.template = template
        self.weight = weight

    def knowledge_distance(self, text_features: torch.Tensor) -> torch.Tensor:
        """1 - mean cosine between learned and hand-made class text features."""
        cos = F.cosine_similarity(text_features.float(), self.hand_made_features(), dim=-1, eps=1e-7)
        return 1 - cos.mean()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        text = self.text_features()
        features = self.clip.image_features(images)
        ce = F.cross_entropy(self.logits(features, text), labels)
        distance = self.knowledge_distance(text)
        loss = ce + self.weight * distance
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        self.log("train/kg_distance", distance, batch_size=len(labels))
        return loss

    def result_fields(self) -> dict[str, Any]:
        return {"kg_weight": self.weight, "template": self.template}

    def prompt_state(self) -> dict[str, Any]:
        return {**super().prompt_state(), "method": "kgcoop"}

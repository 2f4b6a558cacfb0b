"""CoCoOp (Zhou et al., "Conditional Prompt Learning for Vision-Language Models", CVPR 2022): CoOp
whose context is conditioned on each image."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.methods.base import LossTerms
from src.methods.coop import CoOp, Features
from src.models.clip import Architecture, FrozenCLIP


class CoCoOp(CoOp):
    """A meta-net Linear(d, d/16) - ReLU - Linear(d/16, width) maps each image's normalised feature
    to a bias added to every context vector; each image is then scored against the prompts of all
    classes built from its own shifted context. Unified context only (the bias is per image).

    Images are batched: the text encoder runs on images x classes prompts at once, at most
    `prompts_per_pass` of them per pass (the test of 1000 classes would not fit otherwise).
    """

    name = "cocoop"
    text_classifier = False  # its text features depend on the image

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: list[str],
        prompts_per_pass: int = 8192,
        class_specific: bool = False,
        **coop_args: Any,
    ) -> None:
        super().__init__(clip, classnames, **coop_args)
        vis_dim = clip.model.visual.output_dim
        width = clip.token_embedding.weight.shape[1]
        self.meta_net = nn.Sequential(
            OrderedDict(
                [
                    ("linear1", nn.Linear(vis_dim, vis_dim // 16)),
                    ("relu", nn.ReLU(inplace=True)),
                    ("linear2", nn.Linear(vis_dim // 16, width)),
                ]
            )
        )
        # 1 where a prompt position holds a context vector, for any class-token position
        order = self.prompt_learner.order
        ctx_mask = (order >= 1) & (order <= self.prompt_learner.n_ctx)
        self.register_buffer("ctx_mask", ctx_mask[..., None].float(), persistent=False)
        self.prompts_per_pass = prompts_per_pass

    @classmethod
    def check_config(cls, args: dict[str, Any], architecture: Architecture) -> None:
        super().check_config(args, architecture)
        check_shared_context(args["class_specific"])

    def loss_terms(self, images: Tensor, labels: Tensor, features: Features | None = None) -> LossTerms:
        """`ce`: the `loss` of its logits, each image scored with its own shifted context."""
        return {"ce": self.loss(self(images), labels)}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of images [b, 3, h, w] or of their image features [b, d]."""
        features = self.clip.image_features(images)
        features = F.normalize(features, dim=-1)
        bias = self.meta_net(features)
        learner = self.prompt_learner
        length = self.clip.text.prompt_length(learner.max_eos)
        prompts = learner(length)  # [n_cls, length, width], the unshifted context
        mask = self.ctx_mask[:, :length]
        per_pass = max(1, self.prompts_per_pass // learner.n_cls)
        logits = []
        for image_features, image_bias in zip(features.split(per_pass), bias.split(per_pass), strict=True):
            n = len(image_bias)
            shifted = prompts + mask * image_bias[:, None, None, :]  # [n, n_cls, length, width]
            # Only SOS is the same for every prompt: the context differs from image to image.
            text = self.clip.text(shifted.flatten(0, 1), learner.eos.repeat(n), 1)
            text = F.normalize(text.view(n, learner.n_cls, -1), dim=-1)
            logits.append(self.clip.logit_scale * torch.einsum("bd,bcd->bc", image_features, text))
        return torch.cat(logits)

    # The text features depend on the image: there is nothing to encode once per evaluation.
    def on_validation_epoch_start(self) -> None:
        pass

    def on_test_epoch_start(self) -> None:
        pass


def check_shared_context(class_specific: bool) -> None:
    if class_specific:
        raise ValueError(
            "method=cocoop has one context shared by all classes (the meta-net's bias is per "
            "image): use ctx=unified"
        )

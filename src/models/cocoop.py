"""CoCoOp (Zhou et al., "Conditional Prompt Learning for Vision-Language Models", CVPR 2022): CoOp
whose context is conditioned on each image."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from src.models.clip import FrozenCLIP
from src.models.coop import CoOp, coop_from_prompt
from src.models.prompt_learner import InitCount, Position


class CoCoOp(CoOp):
    """A meta-net Linear(d, d/16) - ReLU - Linear(d/16, width) maps each image's normalised feature
    to a bias added to every context vector; each image is then scored against the prompts of all
    classes built from its own shifted context. Unified context only (the bias is per image).

    Images are batched: the text encoder runs on images x classes prompts at once, at most
    `prompts_per_pass` of them per pass (the test of 1000 classes would not fit otherwise).
    """

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: list[str],
        n_ctx: int = 16,
        ctx_init: str | None = None,
        class_specific: bool = False,
        class_token_position: Position = "end",
        ctx_init_count: InitCount = "words",
        lr: float = 0.002,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        warmup_epochs: int = 1,
        warmup_lr: float = 1e-5,
        prompts_per_pass: int = 8192,
    ) -> None:
        if class_specific:
            raise ValueError(
                "method=cocoop has one context shared by all classes (the meta-net's bias is per "
                "image): use ctx=unified"
            )
        super().__init__(
            clip,
            classnames,
            n_ctx=n_ctx,
            ctx_init=ctx_init,
            class_token_position=class_token_position,
            ctx_init_count=ctx_init_count,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            warmup_epochs=warmup_epochs,
            warmup_lr=warmup_lr,
        )
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

    def prompt_state(self) -> dict[str, Any]:
        meta_net = {k: v.detach().cpu().clone() for k, v in self.meta_net.state_dict().items()}
        return {**super().prompt_state(), "method": "cocoop", "meta_net": meta_net}


def cocoop_from_prompt(
    state: dict[str, Any], clip: FrozenCLIP, classnames: list[str] | None = None
) -> CoCoOp:
    """Rebuilds CoCoOp from its prompt file, for its own or another class list."""
    module = coop_from_prompt(state, clip, classnames, module_cls=CoCoOp)
    module.meta_net.load_state_dict(state["meta_net"])
    return module

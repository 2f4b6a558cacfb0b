"""IVLP, independent vision-language prompting: learned prompts in the first blocks of both encoders,
each tower its own (no coupling); the baseline of MaPLe (Khattak et al., CVPR 2023) and PromptSRC
(Khattak et al., ICCV 2023), from their official code (trainers/independentVL.py)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from src.methods.coop import CoOp
from src.models import deep_prompts
from src.models.clip import FrozenCLIP
from src.models.prompt_learner import Position, PromptLearner, token_count

log = logging.getLogger(__name__)


class IVLP(CoOp):
    """Text: CoOp's context at the input, then for blocks 1 .. J_t-1 learned deep prompts that
    replace the context positions' hidden states. Image: n_v learned tokens appended after the
    patch tokens at the input (through ln_pre), then for blocks 1 .. J_v-1 learned tokens that
    replace the previous block's outputs there; the class token alone is pooled. Unlike MaPLe,
    nothing ties the image prompts to the text ones. Unified context, class name at the end, ViT only.

    As the official code: with ctx_init the phrase's first n_ctx tokens are learned and the rest
    stays words of every prompt; a context longer than the phrase starts random (std 0.02) behind
    "X X ..."; deep text prompts and all image prompts start normal(std 0.02).
    """

    name = "ivlp"
    prompts_images = True
    text_classifier = False  # its logits need its own image features

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: list[str],
        prompt_depth_text: int = 9,
        prompt_depth_vision: int = 9,
        n_ctx_vision: int = 4,
        n_ctx: int = 4,
        ctx_init: str | None = "a photo of a",
        class_specific: bool = False,
        class_token_position: Position = "end",
        lr: float = 0.0025,
        **coop_args: Any,
    ) -> None:
        visual = clip.model.visual
        deep_prompts.check_prompt_ready_vit(visual, clip.name)
        if class_specific or class_token_position != "end":
            raise ValueError(
                f"method={self.name} has one context shared by all classes, before the class name: use "
                "ctx=unified ctx.class_token_position=end"
            )
        text_layers = len(clip.text.tower.transformer.resblocks)
        image_layers = len(visual.transformer.resblocks)
        if not 1 <= prompt_depth_text <= text_layers:
            raise ValueError(
                f"method.module.prompt_depth_text={prompt_depth_text}: use 1 .. {text_layers} (the text "
                f"blocks of {clip.name}; 1: the context at the input only)"
            )
        if not 0 <= prompt_depth_vision <= image_layers:
            raise ValueError(
                f"method.module.prompt_depth_vision={prompt_depth_vision}: use 0 .. {image_layers} (the "
                f"image blocks of {clip.name}; 0: no image prompts)"
            )
        if prompt_depth_vision and n_ctx_vision < 1:
            raise ValueError(
                f"method.module.n_ctx_vision={n_ctx_vision}: give at least 1 image prompt token, or "
                "method.module.prompt_depth_vision=0 for none"
            )
        if ctx_init and n_ctx > token_count(clip.tokenize, ctx_init.replace("_", " ").strip()):
            # The official code starts from the words only for n_ctx <= 4, the tokens of its phrase.
            log.info("ctx.n_ctx=%d is longer than ctx.init=%r: the context starts random", n_ctx, ctx_init)
            ctx_init = None
        super().__init__(
            clip,
            classnames,
            n_ctx=n_ctx,
            ctx_init=ctx_init,
            class_specific=class_specific,
            class_token_position=class_token_position,
            lr=lr,
            **coop_args,
        )
        text_width = clip.token_embedding.weight.shape[1]
        deep_shape = (prompt_depth_text - 1, self.prompt_learner.n_ctx, text_width)
        self.deep_text = nn.Parameter(torch.empty(deep_shape).normal_(std=0.02))
        image_shape = (prompt_depth_vision, n_ctx_vision, visual.transformer.width)
        self.visual_prompts = nn.Parameter(torch.empty(image_shape).normal_(std=0.02))

    def make_prompt_learner(self, classnames: list[str], clip: FrozenCLIP, **options: Any) -> PromptLearner:
        # CoOp learns all the words of ctx_init; IVLP only the first n_ctx, as MaPLe.
        return super().make_prompt_learner(classnames, clip, **options, learned_init_tokens=options["n_ctx"])

    def text_features(self) -> torch.Tensor:
        learner = self.prompt_learner
        prompts = learner(self.clip.text.prompt_length(learner.max_eos))
        return deep_prompts.encode_text(self.clip.text, prompts, learner.eos, list(self.deep_text))

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(
                f"method={self.name} prompts the image encoder, so it takes images, not cached image "
                "features: use data.cache_features=false data.train_views=0"
            )
        return deep_prompts.encode_image(self.clip.model.visual, images, list(self.visual_prompts))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of images [b, 3, h, w]."""
        text = self._eval_text_features
        if text is None:
            text = self.text_features()
        return self.logits(self.image_features(images), text)

    def result_fields(self) -> dict[str, Any]:
        return {
            **super().result_fields(),
            "prompt_depth_text": len(self.deep_text) + 1,
            "prompt_depth_vision": len(self.visual_prompts),
            "n_ctx_vision": self.visual_prompts.shape[1],
        }

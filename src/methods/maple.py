"""MaPLe (Khattak et al., "MaPLe: Multi-modal Prompt Learning", CVPR 2023): prompts in the first J
blocks of both encoders, the image ones coupled to the text ones."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from src.common.messages import override
from src.methods.ivlp import DeepPrompts, learned_prompts, words_or_random
from src.models import deep_prompts
from src.models.clip import Architecture, FrozenCLIP
from src.models.prompt_learner import Position


class MaPLe(DeepPrompts):
    """CoOp's context (layer 0 of the text encoder) plus, for blocks 1 .. J-1, learned deep prompts
    that replace the context positions' hidden states; the image encoder gets, for each of the J
    blocks, as many extra tokens made from that block's text prompts by a coupling function
    Linear(text width, image width). Unified context, class name at the end, ViT only.

    As the reference: with ctx_init, the first n_ctx tokens are learned and the rest stay words of
    the prompt ("a photo" + "of a {class}."), a context longer than the phrase starts random; deep
    prompts start normal(std 0.02); the deep coupling functions start as copies of one Linear.
    """

    name = "maple"

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: list[str],
        prompt_depth: int = 9,
        n_ctx: int = 2,
        ctx_init: str | None = "a photo of a",
        class_specific: bool = False,
        class_token_position: Position = "end",
        **coop_args: Any,
    ) -> None:
        visual = clip.model.visual
        deep_prompts.check_prompt_ready_vit(visual, clip.name)
        ctx_init = words_or_random(clip, n_ctx, ctx_init)
        super().__init__(clip, classnames, n_ctx=n_ctx, ctx_init=ctx_init, **coop_args)
        n_ctx = self.prompt_learner.n_ctx
        text_width = clip.token_embedding.weight.shape[1]
        image_width = visual.transformer.width
        # Drawn from torch's generator in the official order (after the context): the first
        # coupling, the deep prompts, the deep couplings' template; a run from the same seed
        # starts where the official one does (tests/test_maple_whole_run.py).
        first_coupling = nn.Linear(text_width, image_width)
        self.deep_text = learned_prompts((prompt_depth - 1, n_ctx, text_width))
        deep_coupling = nn.Linear(text_width, image_width)
        self.couplings = nn.ModuleList(
            [first_coupling, *(copy.deepcopy(deep_coupling) for _ in range(prompt_depth - 1))]
        )

    @classmethod
    def check_config(cls, args: dict[str, Any], architecture: Architecture) -> None:
        super().check_config(args, architecture)
        check_maple(args["prompt_depth"], args["class_specific"], args["class_token_position"], architecture)

    def text_prompts(self) -> list[torch.Tensor]:
        """The text prompts of blocks 0 .. J-1, each [n_ctx, text width]."""
        return [self.prompt_learner.ctx, *self.deep_text]

    def image_prompts(self) -> list[torch.Tensor]:
        """Each block's image tokens, coupled to its text prompts."""
        return [coupling(p) for coupling, p in zip(self.couplings, self.text_prompts(), strict=True)]

    def result_fields(self) -> dict[str, Any]:
        return {**super().result_fields(), "prompt_depth": len(self.couplings)}


def check_maple(prompt_depth: int, class_specific: bool, position: str, architecture: Architecture) -> None:
    """MaPLe's prompts are tokens of a ViT, in its first `prompt_depth` blocks (and the text
    encoder's), after one context shared by all classes."""
    if architecture.image_encoder != "vit":
        raise ValueError(
            f"model.name={architecture.name}: its image encoder ({architecture.image_encoder}) has no "
            "token sequence to put prompts into; multi-modal prompts need a ViT, e.g. model=vit_b16"
        )
    if class_specific or position != "end":
        raise ValueError(
            "method=maple has one context shared by all classes, before the class name: use "
            "ctx=unified ctx.class_token_position=end"
        )
    blocks = min(b for b in (architecture.image_blocks, architecture.text_blocks) if b is not None)
    if not 1 <= prompt_depth <= blocks:
        raise ValueError(
            f"method.module.prompt_depth={prompt_depth}: {architecture.name} has {blocks} blocks per "
            f"encoder: use {override('method.module.prompt_depth', min(max(prompt_depth, 1), blocks))} "
            "(prompts in that many blocks)"
        )

"""IVLP, independent vision-language prompting: learned prompts in the first blocks of both encoders,
each tower its own (no coupling); the baseline of MaPLe (Khattak et al., CVPR 2023) and PromptSRC
(Khattak et al., ICCV 2023), from their official code (trainers/independentVL.py)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from src.common.messages import override
from src.methods.coop import CoOp
from src.models import deep_prompts
from src.models.clip import Architecture, FrozenCLIP
from src.models.prompt_learner import Position, PromptLearner, token_count

log = logging.getLogger(__name__)


class DeepPrompts(CoOp):
    """CoOp's context at the text encoder's input, then learned deep prompts that replace the
    context positions' hidden states entering text blocks 1 .. J-1 (`deep_text`), and prompts of the
    image encoder (`image_prompts`, each block's): what IVLP and MaPLe share. With ctx_init, the
    phrase's first n_ctx tokens are learned and the rest stays words of every prompt."""

    needs_images = True  # its prompts enter the image encoder
    text_classifier = False  # its logits need its own image features
    deep_text: nn.Parameter  # [J - 1, n_ctx, text width]

    def make_prompt_learner(self, classnames: list[str], clip: FrozenCLIP, **options: Any) -> PromptLearner:
        # CoOp learns all the words of ctx_init; these methods only the first n_ctx.
        return super().make_prompt_learner(classnames, clip, **options, learned_init_tokens=options["n_ctx"])

    def text_features(self) -> torch.Tensor:
        learner = self.prompt_learner
        prompts = learner(self.clip.text.prompt_length(learner.max_eos))
        return deep_prompts.encode_text(self.clip.text, prompts, learner.eos, list(self.deep_text))

    def image_prompts(self) -> list[torch.Tensor]:
        """The tokens of image blocks 0 .. J_v-1, each [n_v, image width]."""
        raise NotImplementedError

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The prompted image features of a batch of images [b, 3, h, w]."""
        if images.ndim != 4:
            raise ValueError(
                f"method={self.name} prompts the image encoder, so it takes images, not cached image "
                "features: use data.cache_features=false data.train_views=0"
            )
        return deep_prompts.encode_image(self.clip.model.visual, images, self.image_prompts())


class IVLP(DeepPrompts):
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
        **coop_args: Any,
    ) -> None:
        visual = clip.model.visual
        deep_prompts.check_prompt_ready_vit(visual, clip.name)
        ctx_init = words_or_random(clip, n_ctx, ctx_init)
        super().__init__(
            clip,
            classnames,
            n_ctx=n_ctx,
            ctx_init=ctx_init,
            class_specific=class_specific,
            class_token_position=class_token_position,
            **coop_args,
        )
        text_width = clip.token_embedding.weight.shape[1]
        deep_shape = (prompt_depth_text - 1, self.prompt_learner.n_ctx, text_width)
        self.deep_text = learned_prompts(deep_shape)
        image_shape = (prompt_depth_vision, n_ctx_vision, visual.transformer.width)
        self.visual_prompts = learned_prompts(image_shape)

    @classmethod
    def check_config(cls, args: dict[str, Any], architecture: Architecture) -> None:
        super().check_config(args, architecture)
        depths = (args["prompt_depth_text"], args["prompt_depth_vision"], args["n_ctx_vision"])
        position = args["class_token_position"]
        check_ivlp(cls.name, *depths, args["class_specific"], position, architecture)

    def image_prompts(self) -> list[torch.Tensor]:
        return list(self.visual_prompts)

    def result_fields(self) -> dict[str, Any]:
        return {
            **super().result_fields(),
            "prompt_depth_text": len(self.deep_text) + 1,
            "prompt_depth_vision": len(self.visual_prompts),
            "n_ctx_vision": self.visual_prompts.shape[1],
        }


def check_ivlp(
    method: str,
    prompt_depth_text: int,
    prompt_depth_vision: int,
    n_ctx_vision: int,
    class_specific: bool,
    class_token_position: str,
    architecture: Architecture,
) -> None:
    """IVLP's prompts are tokens of a ViT, in the first blocks of each encoder, after one context
    shared by all classes."""
    if architecture.image_encoder != "vit":
        raise ValueError(
            f"model.name={architecture.name}: its image encoder ({architecture.image_encoder}) has no "
            f"token sequence to put prompts into; method={method} needs a ViT, e.g. model=vit_b16"
        )
    if class_specific or class_token_position != "end":
        raise ValueError(
            f"method={method} has one context shared by all classes, before the class name: use "
            "ctx=unified ctx.class_token_position=end"
        )
    depths = (
        ("text", prompt_depth_text, 1, architecture.text_blocks),
        ("vision", prompt_depth_vision, 0, architecture.image_blocks),
    )
    wrong = [(t, d, low, n) for t, d, low, n in depths if n is not None and not low <= d <= n]
    if wrong:
        given = ", ".join(f"method.module.prompt_depth_{t}={d}" for t, d, _, _ in wrong)
        blocks = " and ".join(f"{n} {t} blocks" for t, _, _, n in wrong)
        fixes = " ".join(
            override(f"method.module.prompt_depth_{t}", min(max(d, low), n)) for t, d, low, n in wrong
        )
        raise ValueError(
            f"{given}: {architecture.name} has {blocks}: use {fixes} (text: 1 .. the text blocks, 1 is "
            "the context at the input only; vision: 0 .. the image blocks, 0 is no image prompts)"
        )
    if prompt_depth_vision and n_ctx_vision < 1:
        raise ValueError(
            f"method.module.n_ctx_vision={n_ctx_vision}: give at least 1 image prompt token "
            f"({override('method.module.n_ctx_vision', 1)}), or "
            f"{override('method.module.prompt_depth_vision', 0)} for none"
        )


def learned_prompts(shape: tuple[int, ...]) -> nn.Parameter:
    """Prompts that train, [blocks, tokens, width], starting normal(std 0.02), each block's drawn
    in turn as the official code draws its per-block tensors; an empty one (depth 1 of the text,
    depth 0 of the image) does not train: DDP refuses a trained parameter that no loss reaches."""
    prompts = torch.empty(shape)
    for block in prompts:
        block.normal_(std=0.02)
    return nn.Parameter(prompts).requires_grad_(prompts.numel() > 0)


def words_or_random(clip: FrozenCLIP, n_ctx: int, ctx_init: str | None) -> str | None:
    """`ctx_init`, or None (a random start) for a context longer than the phrase: the official
    MaPLe and IVLP code start from the words only for n_ctx <= 4, the tokens of their phrase, and
    learn the first n_ctx of them (CoOp would learn the phrase's tokens only)."""
    if ctx_init and n_ctx > token_count(clip.tokenize, ctx_init.replace("_", " ").strip()):
        log.info("ctx.n_ctx=%d is longer than ctx.init=%r: the context starts random", n_ctx, ctx_init)
        return None
    return ctx_init

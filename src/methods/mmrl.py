"""MMRL (Guo and Gu, "MMRL: Multi-Modal Representation Learning for Vision-Language Models", CVPR
2025): a shared representation space projected into the higher blocks of both encoders, and a
second image head on the representation tokens for the classes it was trained on."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from src.common.messages import override
from src.methods.base import Method, TextOncePerEvaluation, ValidatesAccuracy, plain
from src.methods.zeroshot import HandMadeGuided, template_text_features
from src.models import rep_tokens
from src.models.clip import Architecture, FrozenCLIP
from src.models.prompt_learner import _check_tokenizer

OFFICIAL_REP_LAYERS = (6, 7, 8, 9, 10, 11, 12)  # ViT-B/16's upper 7 of 12 blocks


class MMRL(TextOncePerEvaluation, ValidatesAccuracy, Method):
    """Representation tokens R [K, rep_dim] (normal, std 0.02), shared by both encoders; for each
    block of `rep_layers` one Linear per encoder maps R to that block's K tokens (image width, text
    width), put after the class token and after the start-of-text token of the dataset's hand-made
    prompt (`template`, no learned context). Image features: the class token's through CLIP's
    frozen projection, and the mean of the K tokens' outputs (each through ln_post) through a
    trained projection `proj_rep` (random, as the official code leaves it).

    Logits are CLIP's (scaled cosines) of either image feature against the class text features;
    on the classes it was trained on (the base classes, a few-shot run), `alpha` x class-token +
    (1 - alpha) x representation logits; rebuilt for another class list (new classes, another
    dataset), the class token's alone. Loss: alpha CE(class token) + (1 - alpha) CE(representation)
    + reg_weight (1 - cos) between the class-token image features and frozen CLIP's of the same
    images, and between the class text features and frozen CLIP's of the same prompts.
    """

    name = "mmrl"
    needs_images = True  # the tokens enter the image encoder

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: list[str],
        template: str,
        n_tokens: int = 5,
        rep_dim: int = 512,
        rep_layers: Sequence[int] = OFFICIAL_REP_LAYERS,
        alpha: float = 0.7,
        reg_weight: float = 1.0,
        trained_classnames: list[str] | None = None,
    ) -> None:
        visual = clip.model.visual
        rep_tokens.check_vit(visual, clip.name)
        _check_tokenizer(clip.tokenize)  # the tokens go after the start-of-text token
        super().__init__(clip, classnames)
        self.template = template
        self.rep_layers = list(rep_layers)
        self.alpha = alpha
        self.reg_weight = reg_weight
        self.trained_classnames = list(trained_classnames or classnames)
        # the official test: fused logits on the classes trained on, the class token's on others
        self.fuse = self.classnames == self.trained_classnames

        image_width, text_width = visual.transformer.width, clip.token_embedding.weight.shape[1]
        self.proj_rep = nn.Parameter(image_width**-0.5 * torch.randn(image_width, visual.output_dim))
        # R: the K tokens of the shared representation space, the source of every block's tokens
        self.representation = nn.Parameter(torch.empty(n_tokens, rep_dim).normal_(std=0.02))
        # As the official code: every block's Linear of an encoder starts as a copy of one.
        to_image, to_text = nn.Linear(rep_dim, image_width), nn.Linear(rep_dim, text_width)
        self.to_image = nn.ModuleList(copy.deepcopy(to_image) for _ in self.rep_layers)
        self.to_text = nn.ModuleList(copy.deepcopy(to_text) for _ in self.rep_layers)

        tokens = clip.tokenize([template.format(name.replace("_", " ")) for name in classnames])
        eos = tokens.argmax(dim=-1)
        # under the causal mask no position after the last end-of-text token reaches one
        tokens = tokens[:, : clip.text.prompt_length(int(eos.max()))]
        tokens = tokens.to(clip.token_embedding.weight.device)
        with torch.no_grad():
            self.register_buffer("prompts", clip.token_embedding(tokens), persistent=False)
        self.register_buffer("eos", eos.to(tokens.device), persistent=False)
        self._text_prefix: torch.Tensor | None = None
        self._frozen_text: torch.Tensor | None = None

    @classmethod
    def check_config(cls, args: dict[str, Any], architecture: Architecture) -> None:
        super().check_config(args, architecture)
        if architecture.image_encoder != "vit":
            raise ValueError(
                f"model.name={architecture.name}: its image encoder ({architecture.image_encoder}) has no "
                "token sequence to put representation tokens into; method=mmrl needs a ViT, e.g. "
                "model=vit_b16"
            )
        tokens = (args["n_tokens"], args["rep_dim"])
        check_mmrl(args["template"], args["rep_layers"], args["alpha"], *tokens, architecture)

    @property
    def start(self) -> int:
        """The first block with tokens, counted from 0."""
        return self.rep_layers[0] - 1

    # -- the encoders with representation tokens --------------------------------------------
    def projected_tokens(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each rep layer's image tokens [K, image width] and text tokens [K, text width]."""
        image = [linear(self.representation) for linear in self.to_image]
        text = [linear(self.representation) for linear in self.to_text]
        return image, text

    def text_prefix(self) -> torch.Tensor:
        """The class prompts' hidden states before the first rep layer: fixed text through frozen
        blocks, so computed once (on the module's device)."""
        if self._text_prefix is None or self._text_prefix.device != self.prompts.device:
            with torch.no_grad():
                self._text_prefix = rep_tokens.text_prefix(self.clip.text, self.prompts, self.start)
        return self._text_prefix

    def text_features(self, tokens: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Class text features [n_cls, d] with the text tokens (this module's by default)."""
        if tokens is None:
            tokens = self.projected_tokens()[1]
        return rep_tokens.text_suffix(self.clip.text, self.text_prefix(), self.eos, tokens, self.start)

    def frozen_text_features(self) -> torch.Tensor:
        """Frozen CLIP's normalised text features of the same prompts (the text regulariser's)."""
        if self._frozen_text is None or self._frozen_text.device != self.prompts.device:
            self._frozen_text = template_text_features(self.clip, self.classnames, [self.template])
        return self._frozen_text

    def image_features(
        self, images: torch.Tensor, tokens: Sequence[torch.Tensor] | None = None, frozen: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The class token's and the representation tokens' image features of `images` [b, 3, h,
        w], and with `frozen`, frozen CLIP's image features (from the blocks before the tokens,
        which both share)."""
        if images.ndim != 4:
            raise ValueError(
                "method=mmrl puts tokens into the image encoder, so it takes images, not cached image "
                "features: use data.cache_features=false data.train_views=0"
            )
        if tokens is None:
            tokens = self.projected_tokens()[0]
        visual = self.clip.model.visual
        x = rep_tokens.image_prefix(visual, images, self.start)
        features, rep_out = rep_tokens.image_suffix(visual, x, tokens, self.start)
        rep_features = rep_out.mean(dim=1) @ self.proj_rep.to(rep_out.dtype)
        clip_features = None
        if frozen:
            with torch.no_grad():
                clip_features = rep_tokens.image_suffix(visual, x, [], self.start)[0]
        return features, rep_features, clip_features

    def scaled_cosines(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """CLIP's logits (100 x cosine for OpenAI's weights, as the official code's constant)."""
        image_features = F.normalize(image_features, dim=-1)
        return self.clip.logit_scale * image_features @ F.normalize(text_features, dim=-1).t()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of images [b, 3, h, w]: fused on the classes trained on, the class
        token's on others."""
        image_tokens, text_tokens = self.projected_tokens()
        text = self._eval_text_features
        if text is None:
            text = self.text_features(text_tokens)
        features, rep_features, _ = self.image_features(images, image_tokens)
        logits = self.scaled_cosines(features, text)
        if not self.fuse:
            return logits
        return self.alpha * logits + (1 - self.alpha) * self.scaled_cosines(rep_features, text)

    # -- training ---------------------------------------------------------------------------
    def loss_parts(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The official loss of a batch and its unweighted parts: `ce` and `ce_rep` (cross-entropy
        of the class-token and representation logits), `reg_image` and `reg_text` (1 - mean cosine
        to frozen CLIP's features of the same images and prompts), `loss`."""
        image_tokens, text_tokens = self.projected_tokens()
        text = self.text_features(text_tokens)
        features, rep_features, clip_features = self.image_features(images, image_tokens, frozen=True)
        terms = {
            "ce": F.cross_entropy(self.scaled_cosines(features, text), labels),
            "ce_rep": F.cross_entropy(self.scaled_cosines(rep_features, text), labels),
            "reg_image": 1 - F.cosine_similarity(features.float(), clip_features.float(), dim=-1).mean(),
            "reg_text": 1 - F.cosine_similarity(text.float(), self.frozen_text_features(), dim=-1).mean(),
        }
        ce = self.alpha * terms["ce"] + (1 - self.alpha) * terms["ce_rep"]
        terms["loss"] = ce + self.reg_weight * (terms["reg_image"] + terms["reg_text"])
        return terms

    def loss_terms(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss parts weighted as the official loss adds them (their sum is `loss_parts`'s
        `loss`, to float rounding)."""
        parts = self.loss_parts(images, labels)
        return {
            "ce": self.alpha * parts["ce"],
            "ce_rep": (1 - self.alpha) * parts["ce_rep"],
            "reg_image": self.reg_weight * parts["reg_image"],
            "reg_text": self.reg_weight * parts["reg_text"],
        }

    # -- results and the prompt file ----------------------------------------------------------
    def hyperparameters(self) -> dict[str, Any]:
        """The arguments that rebuild the method (besides CLIP and the class list)."""
        return {
            "template": self.template,
            "n_tokens": self.representation.shape[0],
            "rep_dim": self.representation.shape[1],
            "rep_layers": self.rep_layers,
            "alpha": self.alpha,
            "reg_weight": self.reg_weight,
            "trained_classnames": self.trained_classnames,
        }

    def result_fields(self) -> dict[str, Any]:
        fields = {k: v for k, v in self.hyperparameters().items() if k != "trained_classnames"}
        return {**super().result_fields(), **fields, "test_logits": "fused" if self.fuse else "class_token"}

    def method_state(self) -> dict[str, Any]:
        return {"hparams": plain(self.hyperparameters()), "weights": self.trained_weights()}

    @classmethod
    def from_prompt(
        cls,
        state: dict[str, Any],
        clip: FrozenCLIP,
        classnames: list[str] | None = None,
        template: str | None = None,
    ) -> MMRL:
        """The method rebuilt for the classes it was trained on (fused logits) or others (the
        class token's logits), with the template of the dataset it is tested on (the official code's
        on transfer targets) or else of the one it was trained on."""
        hparams = {**state["hparams"], **({"template": template} if template else {})}
        return cls.rebuilt(state, clip, classnames, hparams)


def check_mmrl(
    template: str,
    rep_layers: Sequence[int],
    alpha: float,
    n_tokens: int,
    rep_dim: int,
    architecture: Architecture,
) -> None:
    """MMRL's options against each other and the backbone's blocks."""
    blocks = [b for b in (architecture.image_blocks, architecture.text_blocks) if b is not None]
    if blocks:
        rep_tokens.check_rep_layers(rep_layers, architecture.name, min(blocks))
    HandMadeGuided.check_template(template)
    if not 0 <= alpha <= 1:
        raise ValueError(
            f"method.module.alpha={alpha}: the class-token logits' weight is within 0 .. 1, e.g. "
            f"{override('method.module.alpha', 0.7)} (the official)"
        )
    if n_tokens < 1 or rep_dim < 1:
        raise ValueError(
            f"method.module.n_tokens={n_tokens}, rep_dim={rep_dim}: give at least one token of at least "
            f"one dimension, e.g. {override('method.module.n_tokens', 5)} "
            f"{override('method.module.rep_dim', 512)} (the official)"
        )

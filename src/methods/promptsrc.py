"""PromptSRC (Khattak et al., "Self-regulating Prompts: Foundational Model Adaptation without
Forgetting", ICCV 2023): IVLP's prompts kept near the frozen CLIP (self-consistency losses) and
aggregated over the epochs with Gaussian weights (GPA)."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from src.methods.base import LossTerms
from src.methods.coop import Features
from src.methods.ivlp import IVLP
from src.methods.zeroshot import template_text_features
from src.models.clip import Architecture, FrozenCLIP

log = logging.getLogger(__name__)

# The frozen teacher's templates in the official code (trainers/imagenet_templates.py: the ImageNet
# list of OpenAI's prompt-engineering notebook), used for every dataset.
IMAGENET_TEMPLATES = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.",
    "the embroidered {}.", "a photo of a hard to see {}.", "a bright photo of a {}.",
    "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.",
    "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.", "a close-up photo of a {}.",
    "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.",
    "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.",
    "a doodle of a {}.", "a close-up photo of the {}.", "the origami {}.", "the {} in a video game.",
    "a sketch of a {}.", "a doodle of the {}.", "a origami {}.", "a low resolution photo of a {}.",
    "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.", "a photo of a large {}.",
    "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.",
    "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.",
)  # fmt: skip


def gpa_weights(mean: float, std: float, epochs: int) -> torch.Tensor:
    """GPA's weight of each epoch 1 .. `epochs` [epochs] (float64): the Gaussian pdf N(e; mean, std)
    normalised to sum 1 over the epochs, as the official code. The pdf's constant factor cancels in
    the normalisation: a softmax of its exponent gives the same ratios, without underflowing to 0/0
    where `mean` lies far from 1 .. epochs."""
    epoch = torch.arange(1, epochs + 1, dtype=torch.float64)
    return torch.softmax(-0.5 * ((epoch - mean) / std) ** 2, dim=0)


class PromptSRC(IVLP):
    """IVLP trained with cross-entropy plus three self-consistency terms against the frozen CLIP:
    `text_loss_weight` x mean |g - g_clip| over the class text features (g_clip: the frozen text
    encoder's raw features of the `templates` averaged per class, then normalised), `image_loss_weight`
    x mean |f - f_clip| over the batch's image features (f_clip: the frozen image encoder's on the same
    images), and KL(p_clip || p) summed over the batch and divided by batch x classes (the official
    reduction); all features normalised, both logits at CLIP's scale. After each epoch e the trained
    prompts are added, weighted by `gpa_weights(gpa_mean, gpa_std, epochs)[e]`, into an aggregate, in
    fp32; after the last epoch the prompts are that aggregate, which is tested and saved.
    """

    name = "promptsrc"

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: list[str],
        text_loss_weight: float = 25.0,
        image_loss_weight: float = 10.0,
        gpa_mean: float = 15.0,
        gpa_std: float = 1.0,
        templates: list[str] | None = None,
        **ivlp_args: Any,
    ) -> None:
        super().__init__(clip, classnames, **ivlp_args)
        self.text_loss_weight = text_loss_weight
        self.image_loss_weight = image_loss_weight
        self.templates = list(templates or IMAGENET_TEMPLATES)
        self._frozen_text: torch.Tensor | None = None
        # The running aggregate of each learned prompt, in fp32: buffers, so that a checkpoint holds
        # it (a resumed run goes on aggregating where it stopped), also within another module (DePT).
        for name, param in self.learned_prompts().items():
            self.register_buffer(aggregate_name(name), torch.zeros_like(param, dtype=torch.float32))

    @classmethod
    def check_config(cls, args: dict[str, Any], architecture: Architecture) -> None:
        super().check_config(args, architecture)
        check_promptsrc(args["gpa_std"], args["templates"])

    # -- self-consistency with the frozen CLIP -----------------------------------------------
    def frozen_text_features(self) -> torch.Tensor:
        """The frozen CLIP's normalised class text features [n_cls, d], computed once per device, in
        fp32 (as the official teacher) also under autocast."""
        if self._frozen_text is None or self._frozen_text.device != self.device:
            names = self.prompt_learner.classnames
            self._frozen_text = template_text_features(self.clip, names, self.templates, normalize_each=False)
        return self._frozen_text

    def self_consistency(
        self, images: torch.Tensor, text: torch.Tensor, image: torch.Tensor, logits: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The weighted regularisers of a batch, given its prompted class text features [n_cls, d],
        image features [b, d] and logits [b, n_cls]: zero where they are the frozen CLIP's."""
        with torch.no_grad():
            frozen_image = F.normalize(self.clip.encode_image(images).float(), dim=-1)
        frozen_text = self.frozen_text_features()
        frozen_logits = self.clip.logit_scale * frozen_image @ frozen_text.t()
        text_l1 = F.l1_loss(F.normalize(text.float(), dim=-1), frozen_text)
        image_l1 = F.l1_loss(F.normalize(image.float(), dim=-1), frozen_image)
        kl = F.kl_div(
            F.log_softmax(logits.float(), dim=-1),
            F.log_softmax(frozen_logits, dim=-1),
            reduction="sum",
            log_target=True,
        )
        return {
            "text": self.text_loss_weight * text_l1,
            "image": self.image_loss_weight * image_l1,
            "logits": kl / logits.numel(),
        }

    def loss_terms(self, images: Tensor, labels: Tensor, features: Features | None = None) -> LossTerms:
        """`ce`, the `loss` of its logits, and the weighted self-consistency terms `scl_text`,
        `scl_image` and `scl_logits` (`images`: the batch's images, which the frozen encoder sees)."""
        image, text = self.features(images) if features is None else features
        logits = self.logits(image, text)
        scl = self.self_consistency(images, text, image, logits)
        return {"ce": self.loss(logits, labels), **{f"scl_{name}": term for name, term in scl.items()}}

    # -- Gaussian prompt aggregation ---------------------------------------------------------
    def learned_prompts(self) -> dict[str, torch.nn.Parameter]:
        """The learned prompts by name (every trained parameter: CLIP's never train)."""
        return {name: param for name, param in self.named_parameters() if param.requires_grad}

    def on_train_start(self) -> None:
        epochs = self.trainer.max_epochs
        if epochs is None or epochs < 1:
            raise ValueError(
                f"trainer.max_epochs={epochs}: method={self.name} aggregates its prompts over a known "
                "number of epochs; set trainer.max_epochs"
            )
        mean = self.hparams.gpa_mean
        if not 1 <= mean <= epochs:
            log.warning(
                "method.module.gpa_mean=%s lies outside epochs 1 .. %d: the aggregate weighs the epochs "
                "nearest to it most (the official recipe: 20 epochs, mean 15)",
                mean,
                epochs,
            )
        if self.current_epoch == 0:  # a resumed run has its aggregate from the checkpoint
            for name in self.learned_prompts():
                self.get_buffer(aggregate_name(name)).zero_()

    def on_train_epoch_end(self) -> None:
        epochs = self.trainer.max_epochs
        weight = float(gpa_weights(self.hparams.gpa_mean, self.hparams.gpa_std, epochs)[self.current_epoch])
        prompts = self.learned_prompts()
        for name, param in prompts.items():
            self.get_buffer(aggregate_name(name)).add_(weight * param.detach().float())
        if self.current_epoch == epochs - 1:
            with torch.no_grad():
                for name, param in prompts.items():
                    param.copy_(self.get_buffer(aggregate_name(name)))
            log.info(
                "prompts: the Gaussian-weighted mean over the %d epochs (mean %s, std %s)",
                epochs,
                self.hparams.gpa_mean,
                self.hparams.gpa_std,
            )

    def result_fields(self) -> dict[str, Any]:
        return {
            **super().result_fields(),
            "text_loss_weight": self.text_loss_weight,
            "image_loss_weight": self.image_loss_weight,
            "gpa_mean": self.hparams.gpa_mean,
            "gpa_std": self.hparams.gpa_std,
            "teacher_templates": len(self.templates),
        }


def check_promptsrc(gpa_std: float, templates: list[str] | None) -> None:
    if not gpa_std > 0:
        raise ValueError(f"method.module.gpa_std={gpa_std}: the Gaussian's standard deviation must be > 0")
    if templates is not None and (not templates or any("{}" not in t for t in templates)):
        raise ValueError(
            f"method.module.templates={templates}: give at least one template, each with {{}} where "
            "the class name goes (null: the official 60 ImageNet templates)"
        )


def aggregate_name(prompt: str) -> str:
    """The buffer of a learned prompt's running aggregate (buffer names hold no dots)."""
    return "gpa_" + prompt.replace(".", "__")

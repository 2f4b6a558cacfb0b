"""Zero-shot CLIP: class text features from hand-made templates, one or an ensemble."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

from src.methods.frozen_classifier import FrozenClassifier
from src.models.clip import Architecture, FrozenCLIP
from src.models.prompt_learner import check_prompts_fit


class HandMadeGuided:
    """For CoOp variants guided by the hand-made prompt (KgCoOp, ProGrad): its normalised class
    text features, computed once on the module's device (CLIP is frozen, so they never change)."""

    template: str
    _hand_made: torch.Tensor | None = None

    @classmethod
    def check_config(cls, args: dict[str, Any], architecture: Architecture) -> None:
        super().check_config(args, architecture)  # the method's (CoOp's) own
        cls.check_template(args["template"])

    @staticmethod
    def check_template(template: str) -> None:
        if "{}" not in template:
            raise ValueError(
                f"method.module.template={template!r}: give a template with {{}} for the class name"
            )

    def hand_made_features(self) -> torch.Tensor:
        if self._hand_made is None or self._hand_made.device != self.device:
            names = self.prompt_learner.classnames
            self._hand_made = template_text_features(self.clip, names, [self.template])
        return self._hand_made


class ZeroShotCLIP(FrozenClassifier):
    """Each class's text feature is the mean of the normalised features of its prompts, one per
    template ("a photo of a {}."), normalised again: the reference's prompt ensembling, which for
    one template is plain zero-shot CLIP."""

    name = "zeroshot"
    text_classifier = True
    zero_shot = True

    def __init__(self, clip: FrozenCLIP, classnames: list[str], templates: list[str]) -> None:
        super().__init__(clip, classnames)
        bad = [t for t in templates if "{}" not in t]
        if not templates or bad:
            raise ValueError(
                f"method.module.templates={list(templates)}: give at least one template, each with "
                "{} where the class name goes"
            )
        self.templates = list(templates)
        self._text_features: torch.Tensor | None = None

    def text_features(self) -> torch.Tensor:
        return template_text_features(self.clip, self.classnames, self.templates)

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        if self._text_features is None:
            self._text_features = self.text_features()
        return self.clip.logit_scale * F.normalize(image_features, dim=-1) @ self._text_features.t()

    def on_test_epoch_start(self) -> None:
        self._text_features = self.text_features()  # on the test device, once

    def result_fields(self) -> dict:
        return {**super().result_fields(), "templates": self.templates}


@torch.no_grad()
def template_text_features(
    clip: FrozenCLIP,
    classnames: list[str],
    templates: list[str],
    normalize_each: bool = True,
    normalize: bool = True,
) -> torch.Tensor:
    """Normalised class text features [n_cls, d] of hand-made prompts: per class the mean of the
    normalised features of its prompts, one per template, normalised again (`normalize_each=False`:
    the mean of the raw features, normalised, as PromptSRC's frozen teacher; with `normalize=False`
    too: that mean itself, unnormalised, as TaskRes's base classifier). In the backbone's own
    precision, also when first asked for within a training step's autocast: the same features
    whichever hook asks first (the teachers of KgCoOp, ProGrad, MMRL and PromptSRC)."""
    names = [name.replace("_", " ") for name in classnames]
    device = clip.token_embedding.weight.device  # the backbone's, wherever built
    total = 0
    # (a device without autocast, such as "meta", has none to leave)
    autocast = torch.amp.is_autocast_available(device.type)
    with torch.autocast(device.type, enabled=False) if autocast else contextlib.nullcontext():
        for template in templates:
            prompts = [template.format(name) for name in names]
            check_prompts_fit(clip.tokenize, prompts, classnames, f"a shorter template than {template!r}")
            tokens = clip.tokenize(prompts).to(device)
            features = clip.model.encode_text(tokens).float()
            total = total + (F.normalize(features, dim=-1) if normalize_each else features)
    mean = total / len(templates)
    return F.normalize(mean, dim=-1) if normalize else mean

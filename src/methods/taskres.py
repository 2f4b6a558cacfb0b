"""TaskRes (Yu et al., "Task Residual for Tuning Vision-Language Models", CVPR 2023): zero-shot
CLIP's text classifier plus a learned residual, one row per class.

classifier = normalise(t + alpha * x), with t the frozen base classifier (per class, the mean of
the raw, unnormalised text features of its prompts, one per template) and x the task residual
[classes, d], from zeros; logits = CLIP's logit scale * cos(f, classifier row). Only x trains. The
official code is geekyutao/TaskRes, `trainers/taskres.py` (read at 5195359); docs/methods.md has
its recipe and where this project differs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from src.common.messages import override
from src.methods.base import Method, TextOncePerEvaluation, ValidatesAccuracy, plain
from src.methods.zeroshot import HandMadeGuided, template_text_features
from src.models.clip import Architecture, FrozenCLIP


class TaskRes(TextOncePerEvaluation, ValidatesAccuracy, Method):
    """The regular TaskRes (the base is zero-shot CLIP's text classifier; the official "enhanced
    base", a classifier fine-tuned beforehand, is not part of it). A zero residual is zero-shot
    CLIP with the mean of its templates' raw text features; the residual's rows belong to the
    trained classes, so the method serves that class list only (`transfers = False`).
    """

    name = "taskres"
    text_classifier = True  # the classifier does not depend on the image
    transfers = False  # a residual row per trained class

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: list[str],
        templates: list[str],
        alpha: float = 0.5,
    ) -> None:
        super().__init__(clip, classnames)
        self.templates = list(templates)
        self.alpha = alpha
        self.residual = nn.Parameter(torch.zeros(len(classnames), clip.embed_dim))
        self._base: torch.Tensor | None = None

    @classmethod
    def check_config(cls, args: dict[str, Any], architecture: Architecture) -> None:
        super().check_config(args, architecture)
        if not args["templates"]:
            raise ValueError(
                "method.module.templates=[]: give at least one template, e.g. "
                f"{override('method.module.templates', '[${dataset.template}]')}"
            )
        for template in args["templates"]:
            HandMadeGuided.check_template(template)
        if not args["alpha"] > 0:
            raise ValueError(
                f"method.module.alpha={args['alpha']}: the residual's scale must be positive (0 leaves "
                f"zero-shot CLIP untrained), e.g. {override('method.module.alpha', 0.5)} (the official)"
            )

    # -- the method -------------------------------------------------------------------------
    def base_text_features(self) -> torch.Tensor:
        """The frozen base classifier t [n_cls, d]: per class the mean of its prompts' raw text
        features (not normalised, as the official code), computed once per device."""
        if self._base is None or self._base.device != self.device:
            self._base = template_text_features(
                self.clip, self.classnames, self.templates, normalize_each=False, normalize=False
            )
        return self._base

    def text_features(self) -> torch.Tensor:
        """The normalised classifier, normalise(t + alpha * x) [n_cls, d]."""
        return F.normalize(self.base_text_features() + self.alpha * self.residual, dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of images [b, 3, h, w] or of their image features [b, d]."""
        text = self._eval_text_features
        if text is None:
            text = self.text_features()
        image = F.normalize(self.clip.image_features(images), dim=-1)
        return self.clip.logit_scale * image @ text.t()

    def loss_terms(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy of the logits, the official loss."""
        return {"ce": F.cross_entropy(self(images), labels)}

    # -- results and the prompt file ----------------------------------------------------------
    def hyperparameters(self) -> dict[str, Any]:
        """The arguments that rebuild the method (besides CLIP and the class list)."""
        return {
            "templates": self.templates,
            "alpha": self.alpha,
        }

    def result_fields(self) -> dict[str, Any]:
        return {**super().result_fields(), **self.hyperparameters()}

    def method_state(self) -> dict[str, Any]:
        """The residual (classes x d numbers) and its arguments; the base is made again from the
        templates."""
        return {"hparams": plain(self.hyperparameters()), "weights": self.trained_weights()}

    @classmethod
    def from_prompt(
        cls,
        state: dict[str, Any],
        clip: FrozenCLIP,
        classnames: list[str] | None = None,
        template: str | None = None,
    ) -> TaskRes:
        """The classifier rebuilt for the classes it was trained on, on the base of the templates it
        was trained with (the residual was learned against that base, whatever dataset it is tested
        on: ImageNet's variants keep ImageNet's)."""
        if classnames is not None and list(classnames) != list(state["classnames"]):
            raise ValueError(
                f"{state['method']}: {cls.transfer_refusal(state)} ({len(state['classnames'])} classes), "
                f"not these {len(classnames)}: test it on the classes it was trained on"
            )
        return cls.rebuilt(state, clip, classnames, state["hparams"])

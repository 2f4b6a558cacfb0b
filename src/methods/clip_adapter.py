"""CLIP-Adapter (Gao et al., "CLIP-Adapter: Better Vision-Language Models with Feature Adapters",
IJCV 2023): zero-shot CLIP whose image features are blended with a small trained bottleneck MLP's
output, the classifier staying the hand-made prompt's class text features.

x = ratio * A(f) + (1 - ratio) * f, with f the frozen image feature (unnormalised, as the encoder
gives it) and A = Linear(d, d / reduction, no bias) - ReLU - Linear(d / reduction, d, no bias) -
ReLU; logits = CLIP's logit scale * cos(x, t_c), t_c the class text features of the dataset's
template. Only A trains. The official code is gaopengcuhk/CLIP-Adapter, `clip_adapter.py` (read at
08d07f8); docs/methods.md has its recipe and where this project differs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from src.common.messages import override
from src.methods.base import Method, ValidatesAccuracy, plain
from src.methods.zeroshot import HandMadeGuided, template_text_features
from src.models.clip import Architecture, FrozenCLIP


class CLIPAdapter(ValidatesAccuracy, Method):
    """The visual adapter of CLIP-Adapter (the variant of its code and of its few-shot results):
    the adapter starts at PyTorch's default init of its Linears (as the official one), so even
    before training its output is blended in; `ratio=0` is zero-shot CLIP exactly.

    The adapter acts on image features only and holds nothing per class: it serves any class list
    (`transfers`), whose class text features are made from the template of the dataset tested.
    """

    name = "clip_adapter"

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: list[str],
        template: str,
        ratio: float = 0.2,
        reduction: int = 4,
    ) -> None:
        super().__init__(clip, classnames)
        dim = clip.embed_dim
        if dim // reduction < 1:
            raise ValueError(
                f"method.module.reduction={reduction}: the bottleneck would have {dim} // {reduction} = 0 "
                f"units for {clip.name}'s {dim}-dimensional features; use "
                f"{override('method.module.reduction', 4)} (the official)"
            )
        self.template = template
        self.ratio, self.reduction = ratio, reduction
        self.adapter = nn.Sequential(
            nn.Linear(dim, dim // reduction, bias=False),
            nn.ReLU(),
            nn.Linear(dim // reduction, dim, bias=False),
            nn.ReLU(),
        )
        self._text: torch.Tensor | None = None

    @classmethod
    def check_config(cls, args: dict[str, Any], architecture: Architecture) -> None:
        super().check_config(args, architecture)
        HandMadeGuided.check_template(args["template"])
        if not 0 <= args["ratio"] <= 1:
            raise ValueError(
                f"method.module.ratio={args['ratio']}: the adapter's share of the blended image feature "
                f"is within 0 .. 1, e.g. {override('method.module.ratio', 0.2)} (the official)"
            )
        if not isinstance(args["reduction"], int) or args["reduction"] < 1:
            raise ValueError(
                f"method.module.reduction={args['reduction']}: the bottleneck divides the feature width by "
                f"a whole number of at least 1, e.g. {override('method.module.reduction', 4)} (the official)"
            )

    # -- the method -------------------------------------------------------------------------
    def text_features(self) -> torch.Tensor:
        """The normalised class text features of the template [n_cls, d], computed once per device
        (CLIP is frozen: they never change)."""
        if self._text is None or self._text.device != self.device:
            self._text = template_text_features(self.clip, self.classnames, [self.template])
        return self._text

    def adapted_features(self, images: torch.Tensor) -> torch.Tensor:
        """ratio * adapter(f) + (1 - ratio) * f of a batch of images or of their image features."""
        features = self.clip.image_features(images)
        return self.ratio * self.adapter(features) + (1 - self.ratio) * features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of images [b, 3, h, w] or of their image features [b, d]."""
        image = F.normalize(self.adapted_features(images), dim=-1)
        return self.clip.logit_scale * image @ self.text_features().t()

    def loss_terms(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy of the logits, the official loss."""
        return {"ce": F.cross_entropy(self(images), labels)}

    # -- results and the prompt file ----------------------------------------------------------
    def hyperparameters(self) -> dict[str, Any]:
        """The arguments that rebuild the method (besides CLIP and the class list)."""
        return {
            "template": self.template,
            "ratio": self.ratio,
            "reduction": self.reduction,
        }

    def result_fields(self) -> dict[str, Any]:
        return {**super().result_fields(), **self.hyperparameters()}

    def method_state(self) -> dict[str, Any]:
        """The adapter's two weight matrices (2 d^2 / reduction numbers) and its arguments."""
        return {"hparams": plain(self.hyperparameters()), "weights": self.trained_weights()}

    @classmethod
    def from_prompt(
        cls,
        state: dict[str, Any],
        clip: FrozenCLIP,
        classnames: list[str] | None = None,
        template: str | None = None,
    ) -> CLIPAdapter:
        """The adapter rebuilt for its own class list or any other, whose class text features are made
        from `template` (the tested dataset's) or else from the template it was trained with."""
        hparams = {**state["hparams"], **({"template": template} if template else {})}
        return cls.rebuilt(state, clip, classnames, hparams)

"""Ensembles of learned prompts (seeds, inits, positions, unified + class-specific): one of the
future directions named by CoOp's authors, evaluated as a method of its own by src.eval."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from src.methods.base import Method

EnsembleMode = Literal["features", "probs"]


class PromptEnsemble(Method):
    """Members rebuilt from prompt files, on one CLIP and one class list.

    `features`: the members' normalised class text features averaged and normalised again (as
    zero-shot CLIP's prompt ensembling), then CLIP's logits; for CoOp-like members, whose text
    features do not depend on the image. `probs`: the members' class probabilities (softmax of
    their logits) averaged, for any members; the logits returned are their log.
    """

    def __init__(self, members: list[Method], mode: EnsembleMode = "features") -> None:
        super().__init__(members[0].clip, members[0].classnames)
        if mode not in ("features", "probs"):
            raise ValueError(f"ensemble={mode}: average the members' text `features` or their `probs`")
        if mode == "features":
            unfit = [type(m).__name__ for m in members if not m.text_classifier]
            if unfit:
                raise ValueError(
                    f"ensemble=features averages class text features, which {unfit} do not have (their "
                    "prediction depends on more than the prompts): use ensemble=probs"
                )
        self.members = nn.ModuleList(members)
        self.mode = mode
        self._text_features: torch.Tensor | None = None

    @torch.no_grad()
    def text_features(self) -> torch.Tensor:
        total = sum(F.normalize(member.text_features().float(), dim=-1) for member in self.members)
        return F.normalize(total / len(self.members), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of images [b, 3, h, w] or of their image features [b, d] (none of whose
        members prompts the image encoder: those take the images)."""
        features = self.clip.image_features(images)
        if self.mode == "features":
            text = self._text_features if self._text_features is not None else self.text_features()
            return self.clip.logit_scale * F.normalize(features.float(), dim=-1) @ text.t()
        inputs = [images if member.needs_images else features for member in self.members]
        probs = sum(member(x).float().softmax(-1) for member, x in zip(self.members, inputs, strict=True))
        return (probs / len(self.members)).log()

    def on_test_epoch_start(self) -> None:
        if self.mode == "features":
            self._text_features = self.text_features()
        else:  # the members' own once-per-evaluation preparation (CoOp encodes its prompts once)
            for member in self.members:
                member.on_test_epoch_start()

    def on_test_epoch_end(self) -> None:
        self._text_features = None
        if self.mode == "probs":
            for member in self.members:
                member.on_test_epoch_end()

"""Tip-Adapter and Tip-Adapter-F (Zhang et al., "Tip-Adapter: Training-free Adaption of CLIP for
Few-shot Classification", ECCV 2022): zero-shot CLIP plus a cache model of the few-shot images.

logits(f) = s * f W^T + alpha * exp(-beta * (1 - f K^T)) V, with f the normalised image feature,
W the hand-made prompts' class text features, s CLIP's logit scale (100 for OpenAI's weights, the
reference's constant), K the cache keys (the normalised few-shot train features, each the mean of
`augment_views` augmented views) and V their one-hot labels. Tip-Adapter-F fine-tunes K.

Unlike the reference, which picks alpha, beta and Tip-Adapter-F's epoch on the test features,
everything here is chosen on the few-shot validation set, before the test split is read: the
cache is built and the search run while fitting (Tip-Adapter fits 0 epochs).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from src.methods.base import Method, check_backbone, plain
from src.methods.zeroshot import template_text_features
from src.models.clip import FrozenCLIP

log = logging.getLogger(__name__)


def search_grid(scale: float, steps: int) -> list[float]:
    """The reference's values: `steps` values from 0.1 by (scale - 0.1) / steps."""
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


class TipAdapter(Method):
    """`finetune=False`: Tip-Adapter; `finetune=True`: Tip-Adapter-F (AdamW on the keys only, cosine
    per step, the epoch of the best validation accuracy at the initial alpha and beta kept)."""

    name = "tip_adapter"

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: list[str],
        templates: list[str],
        augment_views: int = 10,
        alpha: float = 1.17,
        beta: float = 1.0,
        search_scale: Sequence[float] = (7.0, 3.0),
        search_steps: Sequence[int] = (200, 20),
        finetune: bool = False,
    ) -> None:
        super().__init__(clip, classnames)
        if augment_views < 1:
            raise ValueError(f"method.module.augment_views={augment_views}: give at least 1 view per image")
        self.templates = list(templates)
        self.augment_views = augment_views
        self.init_alpha, self.init_beta = alpha, beta
        self.search_scale, self.search_steps = tuple(search_scale), tuple(search_steps)
        self.finetune = finetune
        self.val_acc = MulticlassAccuracy(num_classes=len(classnames), average="micro")
        dim = clip.model.visual.output_dim
        self.keys = nn.Parameter(torch.zeros(0, dim), requires_grad=finetune)
        for name in ("values", "best_keys"):
            self.register_buffer(name, torch.zeros(0, dim))
        # the state of fitting, in checkpoints so that a resumed run goes on from it
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float64))
        self.register_buffer("beta", torch.tensor(beta, dtype=torch.float64))
        self.register_buffer("cache_built", torch.tensor(False))
        self.register_buffer("searched", torch.tensor(False))
        self.register_buffer("best_val_acc", torch.tensor(-1.0))
        self.register_buffer("best_epoch", torch.tensor(-1))
        self.val_acc_searched: float | None = None
        self._zero_shot: torch.Tensor | None = None

    # -- the cache model --------------------------------------------------------------------
    def set_cache(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Cache keys [n, d] (normalised here) and values [n, n_classes]."""
        self.keys = nn.Parameter(F.normalize(keys.float(), dim=-1), requires_grad=self.finetune)
        self.values = values.float()
        self.best_keys = self.keys.detach().clone()

    def zero_shot_features(self) -> torch.Tensor:
        if self._zero_shot is None or self._zero_shot.device != self.device:
            self._zero_shot = template_text_features(self.clip, self.classnames, self.templates)
        return self._zero_shot

    def logits(
        self, features: torch.Tensor, alpha: float | None = None, beta: float | None = None
    ) -> torch.Tensor:
        alpha = self.alpha if alpha is None else alpha
        beta = self.beta if beta is None else beta
        features = F.normalize(features.float(), dim=-1)
        clip_logits = self.clip.logit_scale * features @ self.zero_shot_features().t()
        affinity = features @ self.keys.t()
        return clip_logits + alpha * torch.exp(-beta * (1 - affinity)) @ self.values

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of images [b, 3, h, w] or of their image features [b, d]."""
        return self.logits(self.clip.image_features(images))

    # -- fitting: cache, fine-tuning, search ------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.keys.shape[0] == 0:
            # shapes only, so that the optimiser and a resumed checkpoint find the parameters
            labels = torch.tensor([item.label for item in self.trainer.datamodule.train_items])
            values = F.one_hot(labels, len(self.classnames))
            self.set_cache(torch.zeros(len(labels), self.keys.shape[1]), values)

    def on_fit_start(self) -> None:
        if not self.cache_built:  # else resumed from a checkpoint
            views, _ = self.trainer.datamodule.image_features("train", views=self.augment_views)
            n = self.keys.shape[0]
            keys = F.normalize(views.view(self.augment_views, n, -1).mean(0), dim=-1)
            with torch.no_grad():
                self.keys.copy_(keys)
                self.best_keys.copy_(keys)
            self.cache_built.fill_(True)
        if not self.finetune:
            self.search_hyperparameters()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        if not self.finetune:  # Tip-Adapter given epochs: nothing learns
            return None
        images, labels = batch
        if images.ndim != 2:
            with torch.no_grad():
                images = self.clip.encode_image(images)
        loss = F.cross_entropy(self.logits(images, self.init_alpha, self.init_beta), labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        features = self.clip.image_features(images)
        self.val_acc.update(self.logits(features, self.init_alpha, self.init_beta), labels)

    def on_validation_epoch_end(self) -> None:
        acc = self.val_acc.compute()
        self.val_acc.reset()
        self.log("val/acc", acc, prog_bar=True)
        if acc > self.best_val_acc:  # the first best epoch, as the reference
            self.best_val_acc.fill_(float(acc))
            self.best_epoch.fill_(self.current_epoch)
            self.best_keys.copy_(self.keys.detach())

    def on_train_end(self) -> None:
        if self.finetune:
            if self.best_epoch >= 0:
                with torch.no_grad():
                    self.keys.copy_(self.best_keys)
                log.info("Tip-Adapter-F: keys of epoch %d (best validation accuracy)", int(self.best_epoch))
            self.search_hyperparameters()

    @torch.no_grad()
    def search_hyperparameters(self) -> None:
        """alpha and beta of the best accuracy on the few-shot validation set (the first best in the
        reference's order: beta outer, alpha inner)."""
        datamodule = self.trainer.datamodule
        if not datamodule.val_items:
            log.info(
                "no validation images: alpha %.3g and beta %.3g as given", self.init_alpha, self.init_beta
            )
            self.searched.fill_(True)
            return
        features, labels = datamodule.image_features("val")
        features = F.normalize(features.to(self.device).float(), dim=-1)
        labels = labels.to(self.device)
        clip_logits = self.clip.logit_scale * features @ self.zero_shot_features().t()
        affinity = features @ self.keys.t()
        best = (-1.0, self.init_alpha, self.init_beta)
        for beta in search_grid(self.search_scale[0], self.search_steps[0]):
            # the cache term once per beta, then every alpha (the reference recomputes it for each)
            cache_logits = torch.exp(-beta * (1 - affinity)) @ self.values
            for alpha in search_grid(self.search_scale[1], self.search_steps[1]):
                acc = ((clip_logits + alpha * cache_logits).argmax(-1) == labels).float().mean().item()
                if acc > best[0]:
                    best = (acc, alpha, beta)
        self.val_acc_searched, alpha, beta = best
        self.alpha.fill_(alpha)
        self.beta.fill_(beta)
        self.searched.fill_(True)
        log.info("%s: alpha %.3f, beta %.3f (validation accuracy %.4f)", self.name, alpha, beta, best[0])

    def on_test_start(self) -> None:
        # A run resumed after its last epoch skips on_train_end: search before testing.
        if not self.searched:
            self.search_hyperparameters()

    # -- results and the portable file ------------------------------------------------------
    def result_fields(self) -> dict[str, Any]:
        val_acc = None if self.val_acc_searched is None else 100 * self.val_acc_searched
        return {
            **super().result_fields(),
            "epochs": self.trainer.max_epochs if self.finetune else 0,
            "alpha": float(self.alpha),
            "beta": float(self.beta),
            "val_acc": val_acc,
            "best_epoch": int(self.best_epoch) if self.finetune else None,
            "augment_views": self.augment_views,
            "cache_size": self.keys.shape[0],
            "templates": self.templates,
        }

    def method_state(self) -> dict[str, Any]:
        """The cache and what rebuilds the classifier (keys: n_shots x classes x d floats)."""
        return {
            "keys": self.keys.detach().cpu().clone(),
            "labels": self.values.argmax(-1).cpu(),
            "templates": self.templates,
            "alpha": float(self.alpha),
            "beta": float(self.beta),
            "hparams": plain({"augment_views": self.augment_views, "finetune": self.finetune}),
        }

    @classmethod
    def from_prompt(
        cls,
        state: dict[str, Any],
        clip: FrozenCLIP,
        classnames: list[str] | None = None,
        template: str | None = None,
    ) -> TipAdapter:
        """Rebuilds a (fine-tuned) Tip-Adapter for its own or another class list: the cache votes
        for the classes of the list that it holds (matched by name); for the others (new classes,
        other datasets) the classifier is zero-shot CLIP with the templates it was built with."""
        check_backbone(state, clip)
        classnames = list(classnames or state["classnames"])
        module = cls(clip, classnames, state["templates"], **state.get("hparams", {}))
        target = {name: index for index, name in enumerate(classnames)}
        values = torch.zeros(len(state["labels"]), len(classnames))
        for row, label in enumerate(state["labels"].tolist()):
            column = target.get(state["classnames"][label])
            if column is not None:
                values[row, column] = 1.0
        module.set_cache(state["keys"], values)
        module.alpha.fill_(state["alpha"])
        module.beta.fill_(state["beta"])
        module.cache_built.fill_(True)
        module.searched.fill_(True)
        module.name = state["method"]
        return module

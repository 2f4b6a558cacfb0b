"""The linear-probe baseline: L2 logistic regression on frozen, unnormalised image features.

As in the reference (lpclip/linear_probe.py): scikit-learn's L-BFGS logistic regression on the
features of the k-shot train images under the test transform, its inverse regularisation C chosen
on the few-shot validation set: the best of 1e6, 1e4, ..., 1e-6, then 8 rounds of bisection in
log10(C) between a tenth and ten times it.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from src.methods.frozen_classifier import FrozenClassifier
from src.models.clip import FrozenCLIP

log = logging.getLogger(__name__)

COARSE_C = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)


def search_c(score: Callable[[float], float], coarse: Sequence[float] = COARSE_C, steps: int = 8) -> float:
    """The C that the reference's search picks for a validation `score(C)`: the best of `coarse`
    (the first on ties), then `steps` rounds that compare the two ends of a range in log10(C),
    starting at [peak / 10, peak * 10], keep the better end (the lower one on ties) and halve the
    range towards it. The last round's choice is the answer."""
    score = functools.cache(score)  # the rounds revisit the ends of earlier ranges
    best = max(coarse, key=score)
    low, high = math.log10(best) - 1, math.log10(best) + 1
    for _ in range(steps):
        left, right = 10.0**low, 10.0**high
        if score(left) < score(right):
            best, low = right, (low + high) / 2
        else:
            best, high = left, (low + high) / 2
    return best


def fit_logistic(
    features: np.ndarray, labels: np.ndarray, C: float, max_iter: int = 1000
) -> LogisticRegression:
    return LogisticRegression(solver="lbfgs", C=C, max_iter=max_iter).fit(features, labels)


class LinearProbe(FrozenClassifier):
    """Fitted at the start of the test, on image features from the data module (the feature cache);
    `C` fixed skips the search."""

    name = "linear_probe"
    transfers = False  # a weight row per trained class

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: list[str],
        C: float | None = None,
        search_steps: int = 8,
        max_iter: int = 1000,
    ) -> None:
        super().__init__(clip, classnames)
        self.C = C  # None: searched; the chosen value is `fitted_C`
        self.fitted_C: float | None = None
        self.search_steps = search_steps
        self.max_iter = max_iter
        self.val_acc: float | None = None
        self.register_buffer("weight", torch.zeros(0), persistent=False)
        self.register_buffer("bias", torch.zeros(0), persistent=False)

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        return image_features.float() @ self.weight.t() + self.bias

    def on_test_start(self) -> None:
        datamodule = self.trainer.datamodule
        if not datamodule.train_items:
            raise ValueError(
                f"method=linear_probe: {datamodule.dataset.root} has no training images (a test-only "
                "dataset): fit the probe on a dataset with a train split"
            )
        if self.C is None and not datamodule.val_items:
            raise ValueError(
                f"method=linear_probe: {datamodule.dataset.root} has no validation images to choose C "
                "on; give C with method.module.C=<value>"
            )
        train = [t.numpy() for t in datamodule.image_features("train")]
        present = set(train[1].tolist())
        missing = [name for label, name in enumerate(self.classnames) if label not in present]
        if missing:
            raise ValueError(
                f"method=linear_probe: no training images for classes {missing[:5]}; "
                "add images for them or remove them from the split"
            )
        val = [t.numpy() for t in datamodule.image_features("val")] if datamodule.val_items else None
        self.fitted_C = self.C
        if self.fitted_C is None:

            def val_accuracy(C: float) -> float:
                return fit_logistic(*train, C, self.max_iter).score(*val)

            self.fitted_C = search_c(val_accuracy, steps=self.search_steps)
        classifier = fit_logistic(*train, self.fitted_C, self.max_iter)
        self.val_acc = classifier.score(*val) if val else None
        log.info("linear probe: C = %.4g, validation accuracy %s", self.fitted_C, self.val_acc)
        self.weight, self.bias = self._as_logits(classifier)

    def _as_logits(self, classifier: LogisticRegression) -> tuple[torch.Tensor, torch.Tensor]:
        """The classifier as a linear layer [n_classes, d] on this module's device (every class
        has training images, so classes_ is 0..n-1)."""
        weight = torch.from_numpy(classifier.coef_).float()
        bias = torch.from_numpy(classifier.intercept_).float()
        if len(classifier.classes_) == 2:
            # binary: one decision value z for class 1; softmax([-z/2, z/2]) = sigmoid(z)
            weight, bias = torch.cat([-weight / 2, weight / 2]), torch.cat([-bias / 2, bias / 2])
        return weight.to(self.device), bias.to(self.device)

    def result_fields(self) -> dict:
        val_acc = None if self.val_acc is None else 100 * self.val_acc
        return {**super().result_fields(), "C": self.fitted_C, "val_acc": val_acc}

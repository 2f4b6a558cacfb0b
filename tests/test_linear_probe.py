"""The linear probe: the reference's search for C on the validation set, and the probe as a method."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression

from src.data.datamodule import FewShotDataModule
from src.data.datasets.oxford_pets import OxfordPets
from src.data.transforms import eval_transform
from src.methods.linear_probe import LinearProbe, fit_logistic, search_c
from src.models.clip import FrozenCLIP
from src.run.training import train
from tests.conftest import make_cfg


def test_search_picks_the_c_of_the_best_validation_accuracy():
    # 1-D features, 4 train images of class 0 and one of class 1: the decision boundary moves from
    # +inf (strong regularisation: all class 0) down to 1.25 (none). Only a boundary between the
    # validation images at 1.7 (class 0) and 1.9 (class 1) gets all four right: C around 1.
    train_x, train_y = np.array([[-2.0], [-1.5], [-1.0], [-0.5], [3.0]]), np.array([0, 0, 0, 0, 1])
    val_x, val_y = np.array([[-1.0], [1.7], [1.9], [3.0]]), np.array([0, 0, 1, 1])

    def val_accuracy(C: float) -> float:
        return fit_logistic(train_x, train_y, C).score(val_x, val_y)

    best = max(val_accuracy(C) for C in np.logspace(-6, 6, 25))
    chosen = search_c(val_accuracy)
    assert best == 1.0 and val_accuracy(chosen) == best
    assert val_accuracy(1e-2) < 1 and val_accuracy(1e2) < 1  # its neighbours on the coarse grid


@pytest.mark.parametrize("peak", [10**2.3, 2e-5, 0.5])
def test_bisection_converges_to_the_peak_between_grid_points(peak):
    evaluated = []

    def score(C: float) -> float:
        evaluated.append(C)
        return -abs(math.log10(C) - math.log10(peak))

    chosen = search_c(score)
    assert abs(math.log10(chosen) - math.log10(peak)) < 2 / 2**7  # 8 halvings of a 2-decade range
    assert len(evaluated) == len(set(evaluated)) <= 7 + 2 * 8  # each C fitted once


def test_linear_probe_method_fits_on_train_features_and_tests(tiny_overrides, tmp_path, data_dir):
    cfg = make_cfg(["dataset=oxford_pets", "shots=4", "method=linear_probe", *tiny_overrides], tmp_path)
    results = train(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == results and saved["method"] == "linear_probe" and saved["ctx"] is None
    assert saved["C"] > 0 and 0 <= saved["val_acc"] <= 100 and saved["num_train"] == 16

    # the same probe straight from scikit-learn, on features of the test transform
    pl.seed_everything(1)  # the run's seed, which made the tiny model's random weights
    clip = FrozenCLIP("coop-tiny", None)
    data = FewShotDataModule(
        OxfordPets(data_dir / "oxford_pets"), shots=4, seed=1, image_size=32, num_workers=0
    )
    data.setup()

    def encode(items):
        images = torch.stack([eval_transform(32)(Image.open(item.path)) for item in items])
        with torch.no_grad():
            return clip.encode_image(images).numpy(), np.array([item.label for item in items])

    probe = fit_logistic(*encode(data.train_items), saved["C"])
    assert saved["val_acc"] == pytest.approx(100 * probe.score(*encode(data.val_items)))
    assert saved["test_acc"] == pytest.approx(100 * probe.score(*encode(data.test_items)))


def test_probe_logits_predict_like_scikit_learn(tiny_clip):
    rng = np.random.default_rng(0)
    for n_classes in (2, 3):
        x = rng.normal(size=(30, 64)).astype(np.float32)
        y = np.arange(30) % n_classes
        x[np.arange(30), y] += 3
        classifier = LogisticRegression(C=0.5, max_iter=1000).fit(x, y)
        probe = LinearProbe(tiny_clip, [str(i) for i in range(n_classes)])
        probe.weight, probe.bias = probe._as_logits(classifier)
        logits = probe(torch.from_numpy(x))
        assert np.array_equal(logits.argmax(-1).numpy(), classifier.predict(x))
        torch.testing.assert_close(logits.softmax(-1), torch.from_numpy(classifier.predict_proba(x)).float())

"""Zero-shot CLIP: one hand-made template, or an ensemble of templates."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from src.methods.coop import CoOp
from src.methods.zeroshot import ZeroShotCLIP
from src.run.training import train
from tests.conftest import make_cfg

CLASSNAMES = ["cat", "golden_retriever", "bird", "sports car"]
ENSEMBLE = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]


def test_zero_shot_equals_coop_with_the_template_words_as_context(tiny_clip):
    zero_shot = ZeroShotCLIP(tiny_clip, CLASSNAMES, ["a photo of a {}."])
    coop = CoOp(tiny_clip, CLASSNAMES, ctx_init="a photo of a")
    torch.manual_seed(0)
    images = torch.randn(12, 3, tiny_clip.image_size, tiny_clip.image_size)
    with torch.no_grad():
        torch.testing.assert_close(
            zero_shot.text_features(), F.normalize(coop.text_features(), dim=-1), atol=1e-5, rtol=1e-5
        )
        expected, logits = coop(images), zero_shot(images)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-5)
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


def test_ensemble_averages_normalised_text_features(tiny_clip):
    templates = ["a photo of a {}.", "art of the {}."]
    ensemble = ZeroShotCLIP(tiny_clip, CLASSNAMES, templates)
    with torch.no_grad():
        per_template = [
            F.normalize(
                tiny_clip.model.encode_text(
                    tiny_clip.tokenize([t.format(c.replace("_", " ")) for c in CLASSNAMES])
                ),
                dim=-1,
            )
            for t in templates
        ]
        expected = F.normalize((per_template[0] + per_template[1]) / 2, dim=-1)
        torch.testing.assert_close(ensemble.text_features(), expected)
        features = torch.randn(5, 64)
        torch.testing.assert_close(
            ensemble(features), tiny_clip.logit_scale * F.normalize(features, dim=-1) @ expected.t()
        )


def test_methods_run_from_the_command_line_config(tiny_overrides, tmp_path):
    common = ["dataset=oxford_pets", "shots=2", *tiny_overrides]
    ensemble = train(make_cfg([*common, "method=zeroshot_ensemble"], tmp_path / "ensemble"))
    assert ensemble["templates"] == [*ENSEMBLE, "a photo of a {}, a type of pet."]
    assert json.loads((tmp_path / "ensemble" / "results.json").read_text())["method"] == "zeroshot_ensemble"
    single = train(make_cfg([*common, "method=zeroshot"], tmp_path / "single"))
    saved = json.loads((tmp_path / "single" / "results.json").read_text())
    assert saved == single and saved["method"] == "zeroshot" and saved["num_test"] == 16
    assert saved["templates"] == ["a photo of a {}, a type of pet."]
    assert saved["ctx"] is None and saved["n_ctx"] is None and 0 <= saved["test_acc"] <= 100
    assert saved["ctx_init_count"] is None
    assert not (tmp_path / "single" / "prompt.pt").exists()  # nothing learned, nothing to save


def test_a_template_needs_a_place_for_the_class_name(tiny_clip):
    with pytest.raises(ValueError, match="method.module.templates"):
        ZeroShotCLIP(tiny_clip, CLASSNAMES, ["a photo"])

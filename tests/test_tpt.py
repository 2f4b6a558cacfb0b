"""Test-time prompt tuning: confident-view selection, the entropy step, the reset between images,
the augmented views and a run through src.train."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from src.common.files import save_torch
from src.data.transforms import AugmentedViews
from src.methods.coop import CoOp
from src.methods.tpt import TestTimePromptTuning, average_entropy, confident_views
from src.run.training import train
from tests.conftest import make_cfg

CLASSNAMES = ["cat", "dog", "sports car", "bird"]


def views(clip, n: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(n, 3, clip.image_size, clip.image_size)


def test_confident_views_keep_the_reference_count_of_lowest_entropy_views():
    torch.manual_seed(0)
    sharpness = torch.rand(64) * 10
    logits = sharpness[:, None] * torch.nn.functional.one_hot(torch.arange(64) % 5, 5).float()
    kept = confident_views(logits, 0.1)
    assert len(kept) == 6  # int(64 * 0.1), as the reference
    assert set(kept.tolist()) == set(torch.argsort(sharpness, descending=True)[:6].tolist())
    assert len(confident_views(logits[:10], 0.5)) == 5
    assert len(confident_views(logits[:4], 0.1)) == 1  # never none


def test_average_entropy_is_the_entropy_of_the_mean_prediction():
    logits = torch.randn(6, 5)
    mean = logits.softmax(-1).mean(0)
    torch.testing.assert_close(average_entropy(logits), -(mean * mean.log()).sum())


def test_step_lowers_the_entropy_and_the_prompt_is_reset_for_each_image(tiny_clip):
    torch.manual_seed(0)
    tpt = TestTimePromptTuning(tiny_clip, CLASSNAMES, selection=0.25, lr=5e-3)
    start = tpt.prompt_learner.ctx.detach().clone()
    a, b = views(tiny_clip, 9, 1), views(tiny_clip, 9, 2)

    def selected_entropy(images):
        with torch.no_grad():
            logits = tpt.logits(tiny_clip.encode_image(images))
            return average_entropy(logits[confident_views(logits, 0.25)])

    before = selected_entropy(a)
    tuned_a = tpt.tune_and_predict(a)
    assert not torch.equal(tpt.prompt_learner.ctx, start)  # the step moved the context
    assert selected_entropy(a) < before - 1e-6
    with torch.no_grad():
        tuned_logits = tpt.logits(tiny_clip.encode_image(a[:1]))[0]
    torch.testing.assert_close(tuned_a, tuned_logits)  # the image is classified with the tuned prompt

    tuned_b = tpt.tune_and_predict(b)
    assert torch.equal(tpt.tune_and_predict(a), tuned_a)  # independent of the images tested before
    assert torch.equal(tpt.tune_and_predict(b), tuned_b)


def test_learned_prompt_as_the_start(tiny_clip, tmp_path):
    coop = CoOp(tiny_clip, CLASSNAMES, n_ctx=3)
    save_torch(tmp_path / "prompt.pt", coop.prompt_state())
    tpt = TestTimePromptTuning(tiny_clip, CLASSNAMES, ckpt=str(tmp_path / "prompt.pt"))
    assert torch.equal(tpt.start_ctx, coop.prompt_learner.ctx)
    assert tpt.result_fields()["n_ctx"] == 3 and tpt.result_fields()["ctx_init"] is None


def test_augmented_views_are_the_image_then_random_views():
    image = Image.fromarray((torch.rand(40, 50, 3) * 255).byte().numpy())
    out = AugmentedViews(32, views=5)(image)
    assert out.shape == (6, 3, 32, 32)
    assert torch.equal(out[0], AugmentedViews(32, views=1)(image)[0])  # the eval transform's view
    assert not torch.equal(out[1], out[2])
    with pytest.raises(ValueError, match="views=0"):
        AugmentedViews(32, views=0)


def test_tpt_run_writes_results(tiny_overrides, tmp_path):
    overrides = [
        "dataset=oxford_pets", "dataset.subsample=new", "method=tpt", "method.data.test_transform.views=3"
    ]  # fmt: skip
    cfg = make_cfg([*overrides, *tiny_overrides], tmp_path)
    assert (cfg.data.test_batch_size, cfg.method.module.lr, cfg.method.module.steps) == (1, 5e-3, 1)
    results = train(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == results and saved["method"] == "tpt" and saved["tpt_views"] == 3
    assert saved["n_ctx"] == 4 and saved["epochs"] == 0 and saved["num_test"] > 0
    assert 0 <= saved["test_acc"] <= 100

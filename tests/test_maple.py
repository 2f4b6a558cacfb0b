"""MaPLe: open_clip's encoders block by block (exact without prompts), deep prompts that change both
towers and train, its recipe, prompt file and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from src.common.files import save_torch
from src.common.prompt_file import load_prompt
from src.methods.base import method_from_prompt
from src.methods.coop import CoOp
from src.methods.maple import MaPLe
from src.models import deep_prompts
from src.run.config import compose_config
from src.run.training import train
from tests.conftest import caches_features, make_cfg

CLASSNAMES = ["cat", "dog", "sports car"]
ROOT = Path(__file__).resolve().parents[1]


def images(clip, n: int = 4) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(n, 3, clip.image_size, clip.image_size)


def test_block_by_block_encoders_without_prompts_are_open_clips(tiny_clip):
    batch = images(tiny_clip)
    tokens = tiny_clip.tokenize(["a photo of a cat.", "dog", "a very long prompt of a sports car."])
    with torch.no_grad():
        image = deep_prompts.encode_image(tiny_clip.model.visual, batch, [])
        text = deep_prompts.encode_text(
            tiny_clip.text, tiny_clip.token_embedding(tokens), tokens.argmax(-1), []
        )
        torch.testing.assert_close(image, tiny_clip.model.encode_image(batch), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(text, tiny_clip.model.encode_text(tokens), atol=1e-5, rtol=1e-5)


def test_depth_one_text_side_is_coop_with_the_same_context(tiny_clip):
    maple = MaPLe(tiny_clip, CLASSNAMES, n_ctx=4, ctx_init=None, prompt_depth=1)
    coop = CoOp(tiny_clip, CLASSNAMES, n_ctx=4)
    with torch.no_grad():
        coop.prompt_learner.ctx.copy_(maple.prompt_learner.ctx)
        torch.testing.assert_close(maple.text_features(), coop.text_features(), atol=1e-5, rtol=1e-5)


def test_reference_context_learns_a_photo_and_keeps_of_a(tiny_clip):
    maple = MaPLe(tiny_clip, CLASSNAMES, prompt_depth=2)
    learner = maple.prompt_learner
    words = tiny_clip.token_embedding(tiny_clip.tokenize(["a photo of a cat."]))[0]
    assert learner.n_ctx == 2 and maple.deep_text.shape == (1, 2, 64)
    torch.testing.assert_close(learner.ctx, words[1:3])  # "a photo": learned
    torch.testing.assert_close(learner.token_suffix[0, :3], words[3:6])  # "of a cat": fixed words
    assert len(maple.couplings) == 2 and maple.couplings[0].in_features == 64
    # longer than the phrase: random, as the official code (n_ctx > 4), not the phrase's 4 tokens
    six = MaPLe(tiny_clip, CLASSNAMES, prompt_depth=2, n_ctx=6)
    assert six.prompt_learner.n_ctx == 6 and six.hparams.ctx_init is None and six.deep_text.shape[1] == 6


def test_deep_prompts_change_both_towers_and_train(tiny_clip):
    torch.manual_seed(0)
    maple = MaPLe(tiny_clip, CLASSNAMES, n_ctx=2, prompt_depth=2)
    batch, labels = images(tiny_clip), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        text, image = maple.text_features(), maple.image_features(batch)
        maple.deep_text.normal_(std=0.5)
        assert (maple.text_features() - text).abs().max() > 1e-3  # deep text prompts enter the text tower
        assert (maple.image_features(batch) - image).abs().max() > 1e-3  # and, coupled, the image tower
        plain = tiny_clip.encode_image(batch)
        assert (image - plain).abs().max() > 1e-3  # the layer-0 image prompts too

    optimizer = torch.optim.SGD([p for p in maple.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(maple(batch), labels)
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            trained = {name for name, p in maple.named_parameters() if p.grad is not None}
            assert trained == {"prompt_learner.ctx", "deep_text"} | {
                f"couplings.{n}" for n, _ in maple.couplings.named_parameters()
            }
            assert maple.deep_text.grad.abs().sum() > 0 and maple.couplings[1].weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05


def test_refusals(tiny_clip):
    with pytest.raises(ValueError, match="prompt_depth=3: .* 2 blocks .*: use method.module.prompt_depth=2 "):
        MaPLe.create(tiny_clip, CLASSNAMES, prompt_depth=3)
    with pytest.raises(ValueError, match="ctx=unified"):
        MaPLe.create(tiny_clip, CLASSNAMES, class_specific=True, prompt_depth=2)
    with pytest.raises(ValueError, match="not cached image features"):
        MaPLe(tiny_clip, CLASSNAMES, prompt_depth=2)(torch.zeros(2, 64))
    with pytest.raises(ValueError, match="need a ViT, e.g. model=vit_b16"):
        deep_prompts.check_prompt_ready_vit(torch.nn.Linear(2, 2), "RN50")


def test_recipe_run_and_prompt_file(tiny_overrides, tmp_path, tiny_clip):
    cfg = make_cfg(["dataset=oxford_pets", "method=maple", "shots=1", *tiny_overrides], tmp_path)
    assert (cfg.trainer.max_epochs, cfg.data.batch_size, cfg.ctx.n_ctx, cfg.ctx.init) == (
        5,
        4,
        2,
        "a photo of a",
    )
    assert (cfg.method.optimizer.lr, cfg.method.module.prompt_depth, caches_features(cfg)) == (
        0.0035,
        9,
        False,
    )
    cfg.trainer.max_epochs = 1
    cfg.method.module.prompt_depth = 2  # the tiny model has 2 blocks
    results = train(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == results and saved["method"] == "maple" and saved["n_ctx"] == 2
    assert saved["prompt_depth"] == 2 and saved["epochs"] == 1
    assert "cache_features: false" in (tmp_path / "config.yaml").read_text()  # turned off by the run

    module = MaPLe(tiny_clip, ["car", "plane"], prompt_depth=2)
    with torch.no_grad():
        module.deep_text.normal_()
    save_torch(tmp_path / "other.pt", module.prompt_state())
    state = load_prompt(tmp_path / "other.pt")
    rebuilt = method_from_prompt(state, tiny_clip, ["apple", "pear"])
    assert isinstance(rebuilt, MaPLe) and rebuilt.prompt_learner.classnames == ["apple", "pear"]
    assert torch.equal(rebuilt.deep_text, module.deep_text)
    same = method_from_prompt(state, tiny_clip, ["car", "plane"])
    with torch.no_grad():
        torch.testing.assert_close(same(images(tiny_clip)), module(images(tiny_clip)))


def test_the_cross_dataset_recipe_in_its_config_is_the_officials():
    """conf/method/maple.yaml's cross-dataset / domain generalisation command composes the official
    vit_b16_c2_ep5_batch4_2ctx_cross_datasets.yaml: lr 0.0026, 2 epochs, depth 3, the rest as the
    base-to-new recipe (batch 4, 2 tokens from "a photo of a", warm-up 1 epoch at 1e-5), 16 shots."""
    comment = (ROOT / "conf" / "method" / "maple.yaml").read_text()
    (line,) = [line for line in comment.splitlines() if "method=maple" in line and "dataset=imagenet" in line]
    cfg = compose_config("train", line.split("python -m src.train ", 1)[1].split())
    module = cfg.method.module
    assert (cfg.dataset.name, cfg.dataset.subsample, cfg.shots, cfg.model.name) == (
        "imagenet",
        "all",
        16,
        "ViT-B-16-quickgelu",
    )
    optimizer, scheduler = cfg.method.optimizer, cfg.method.scheduler
    assert (optimizer.lr, cfg.trainer.max_epochs, module.prompt_depth) == (0.0026, 2, 3)
    assert (cfg.data.batch_size, cfg.ctx.n_ctx, cfg.ctx.init) == (4, 2, "a photo of a")
    assert (optimizer._target_, optimizer.momentum, optimizer.weight_decay) == ("torch.optim.SGD", 0.9, 5e-4)
    assert (scheduler.warmup_epochs, scheduler.warmup_lr) == (1, 1e-5)

"""IVLP: deep prompts in each tower where the official code puts them, the towers independent, CoOp
at depth 1 without image prompts, its recipe, prompt file, src.eval and refusals."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet

from src.common.prompt_file import load_prompt
from src.methods.base import method_from_prompt
from src.methods.coop import CoOp
from src.methods.ivlp import IVLP
from src.methods.maple import MaPLe
from src.run.config import compose_config
from src.run.evaluation import evaluate
from src.run.training import train
from tests.conftest import caches_features, make_cfg, run_clip

CLASSNAMES = ["cat", "dog", "sports car"]


def images(clip, n: int = 4) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(n, 3, clip.image_size, clip.image_size)


def official_text_features(clip, module: IVLP) -> torch.Tensor:
    """The official IVLP text encoder written out on open_clip's modules: all 77 positions, the
    context at positions 1..n at the input (with positional embeddings), replaced before block i >= 1
    by deep prompt i-1 (without), ln_final, the EOS token, text_projection."""
    tower, learner = clip.text.tower, module.prompt_learner
    n = learner.n_ctx
    x = learner() + tower.positional_embedding
    for i, block in enumerate(tower.transformer.resblocks):
        if 1 <= i <= len(module.deep_text):
            x = torch.cat([x[:, :1], module.deep_text[i - 1].expand(len(x), -1, -1), x[:, 1 + n :]], dim=1)
        x = block(x, attn_mask=tower.attn_mask)
    x = tower.ln_final(x)
    return x[torch.arange(len(x)), learner.eos] @ tower.text_projection


def official_image_features(clip, module: IVLP, batch: torch.Tensor) -> torch.Tensor:
    """The official IVLP image encoder written out: patch and class tokens plus positional embeddings,
    the first prompts appended after them, ln_pre over all, the last n tokens replaced before block
    i >= 1 by prompt i, the class token through ln_post and proj."""
    visual, prompts = clip.model.visual, module.visual_prompts
    n = prompts.shape[1]
    x = visual.conv1(batch).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(len(x), 1, -1), x], dim=1) + visual.positional_embedding
    x = visual.ln_pre(torch.cat([x, prompts[0].expand(len(x), -1, -1)], dim=1))
    for i, block in enumerate(visual.transformer.resblocks):
        if 1 <= i < len(prompts):
            x = torch.cat([x[:, :-n], prompts[i].expand(len(x), -1, -1)], dim=1)
        x = block(x)
    return visual.ln_post(x[:, 0]) @ visual.proj


def test_prompts_enter_both_towers_as_in_the_official_code(tiny_clip):
    assert tiny_clip.text.tower.transformer.batch_first and tiny_clip.model.visual.transformer.batch_first
    torch.manual_seed(0)
    module = IVLP(tiny_clip, CLASSNAMES, prompt_depth_text=2, prompt_depth_vision=2, n_ctx_vision=3)
    with torch.no_grad():
        for param in (module.prompt_learner.ctx, module.deep_text, module.visual_prompts):
            param.normal_(std=0.5)
        batch = images(tiny_clip)
        text, image = module.text_features(), module.image_features(batch)
        torch.testing.assert_close(text, official_text_features(tiny_clip, module), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            image, official_image_features(tiny_clip, module, batch), atol=1e-5, rtol=1e-5
        )
        assert (image - tiny_clip.encode_image(batch)).abs().max() > 1e-2  # the prompts matter


def test_the_towers_are_independent_and_every_prompt_trains(tiny_clip):
    torch.manual_seed(0)
    module = IVLP(tiny_clip, CLASSNAMES, prompt_depth_text=2, prompt_depth_vision=2)
    batch, labels = images(tiny_clip), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        text, image = module.text_features(), module.image_features(batch)
        module.visual_prompts.normal_(std=0.5)  # image prompts: the text features stay
        assert torch.equal(module.text_features(), text)
        assert (module.image_features(batch) - image).abs().max() > 1e-3
        image = module.image_features(batch)
        module.deep_text.normal_(std=0.5)  # deep text prompts: the image features stay (MaPLe's change)
        assert torch.equal(module.image_features(batch), image)
        assert (module.text_features() - text).abs().max() > 1e-3

    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(module(batch), labels)
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            trained = {name for name, p in module.named_parameters() if p.grad is not None}
            assert trained == {"prompt_learner.ctx", "deep_text", "visual_prompts"}
            assert all(p.grad.abs().sum() > 0 for p in (module.deep_text, module.visual_prompts))
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05


def test_depth_one_without_image_prompts_is_coop_with_the_same_context(tiny_clip):
    module = IVLP(tiny_clip, CLASSNAMES, prompt_depth_text=1, prompt_depth_vision=0, ctx_init=None)
    coop = CoOp(tiny_clip, CLASSNAMES, n_ctx=4)
    assert module.deep_text.numel() == module.visual_prompts.numel() == 0
    with torch.no_grad():
        coop.prompt_learner.ctx.copy_(module.prompt_learner.ctx)
        batch = images(tiny_clip)
        torch.testing.assert_close(module(batch), coop(batch), atol=1e-4, rtol=1e-5)


def test_the_official_context_words_or_random_start(tiny_clip):
    words = tiny_clip.token_embedding(tiny_clip.tokenize(["a photo of a cat."]))[0]
    four = IVLP(tiny_clip, CLASSNAMES, prompt_depth_text=2, prompt_depth_vision=1)
    torch.testing.assert_close(four.prompt_learner.ctx, words[1:5])  # "a photo of a": all learned
    two = IVLP(tiny_clip, CLASSNAMES, n_ctx=2, prompt_depth_text=2, prompt_depth_vision=1)
    torch.testing.assert_close(two.prompt_learner.ctx, words[1:3])  # "a photo" learned,
    torch.testing.assert_close(two.prompt_learner.token_suffix[0, :3], words[3:6])  # "of a cat" fixed
    assert two.deep_text.shape == (1, 2, 64) and two.visual_prompts.shape == (1, 4, 64)
    # longer than the phrase: random behind "X X X X X X", as the official code (n_ctx > 4)
    six = IVLP(tiny_clip, CLASSNAMES, n_ctx=6, prompt_depth_text=2, prompt_depth_vision=1)
    assert six.prompt_learner.n_ctx == 6 and six.hparams.ctx_init is None
    assert six.prompt_learner.ctx.std() < 0.05 and six.result_fields()["ctx_init"] is None


def test_refusals(tiny_clip):
    fix = r"coop-tiny has 2 text blocks: use method.module.prompt_depth_text=2 \(text: 1 .. "
    with pytest.raises(ValueError, match=rf"prompt_depth_text=3: {fix}"):
        IVLP.create(tiny_clip, CLASSNAMES, prompt_depth_text=3, prompt_depth_vision=2)
    with pytest.raises(ValueError, match=r"prompt_depth_text=0: .* use method.module.prompt_depth_text=1 "):
        IVLP.create(tiny_clip, CLASSNAMES, prompt_depth_text=0, prompt_depth_vision=2)
    fix = r"coop-tiny has 2 vision blocks: use method.module.prompt_depth_vision=2 \(text"
    with pytest.raises(ValueError, match=rf"prompt_depth_vision=9: {fix}"):
        IVLP.create(tiny_clip, CLASSNAMES, prompt_depth_text=2)
    with pytest.raises(ValueError, match="n_ctx_vision=0: give at least 1 .*prompt_depth_vision=0"):
        IVLP.create(tiny_clip, CLASSNAMES, prompt_depth_text=2, prompt_depth_vision=2, n_ctx_vision=0)
    with pytest.raises(ValueError, match="method=ivlp has one context .* ctx=unified"):
        IVLP.create(tiny_clip, CLASSNAMES, class_specific=True, prompt_depth_text=2, prompt_depth_vision=2)
    with pytest.raises(ValueError, match="not cached image features: use data.cache_features=false"):
        IVLP(tiny_clip, CLASSNAMES, prompt_depth_text=2, prompt_depth_vision=2)(torch.zeros(2, 64))
    resnet = ModifiedResNet(layers=(1, 1, 1, 1), output_dim=32, heads=2, image_size=32, width=8)
    rn50 = SimpleNamespace(model=SimpleNamespace(visual=resnet), name="RN50")
    with pytest.raises(
        ValueError, match="model.name=RN50: its image encoder \\(resnet\\) .* needs a ViT, e.g. model=vit_b16"
    ):
        IVLP.create(rn50, CLASSNAMES)


def test_recipe_run_prompt_file_and_eval(tiny_overrides, eval_overrides, tmp_path, tiny_clip):
    cfg = make_cfg(["dataset=oxford_pets", "method=ivlp", "shots=1", *tiny_overrides], tmp_path / "run")
    module_cfg = cfg.method.module
    assert (cfg.trainer.max_epochs, cfg.data.batch_size, cfg.ctx.n_ctx, cfg.ctx.init) == (
        20,
        4,
        4,
        "a photo of a",
    )
    assert cfg.method.optimizer.lr == 0.0025
    assert (module_cfg.prompt_depth_text, module_cfg.prompt_depth_vision) == (9, 9)
    assert module_cfg.n_ctx_vision == 4 and caches_features(cfg) is False
    cfg.trainer.max_epochs = 1
    module_cfg.prompt_depth_text = module_cfg.prompt_depth_vision = 2  # the tiny model has 2 blocks
    trained = train(cfg)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved == trained and saved["method"] == "ivlp" and saved["n_ctx"] == 4
    assert (saved["prompt_depth_text"], saved["prompt_depth_vision"], saved["n_ctx_vision"]) == (2, 2, 4)

    ckpt = tmp_path / "run" / "prompt.pt"
    evaluated = evaluate(
        compose_config("eval", [f"ckpt={ckpt}", "dataset=oxford_pets", *eval_overrides], tmp_path / "eval")
    )
    assert evaluated["method"] == "ivlp" and evaluated["test_acc"] == trained["test_acc"]
    state = load_prompt(ckpt)
    assert set(state["weights"]) == {"deep_text", "visual_prompts"}  # besides ctx: nothing of CLIP
    rebuilt = method_from_prompt(state, run_clip(), ["apple", "pear"])  # the run's random weights
    assert isinstance(rebuilt, IVLP) and rebuilt.prompt_learner.classnames == ["apple", "pear"]
    assert torch.equal(rebuilt.visual_prompts, state["weights"]["visual_prompts"])


def test_the_shallowest_prompts_train_no_empty_parameter(tiny_clip):
    """Text depth 1 and image depth 0 (IVLP), depth 1 (MaPLe): no deep prompts, and no trained
    parameter without elements, which DDP (find_unused_parameters=False) would refuse."""
    shallow = [
        IVLP(tiny_clip, CLASSNAMES, prompt_depth_text=1, prompt_depth_vision=0),
        MaPLe(tiny_clip, CLASSNAMES, prompt_depth=1),
    ]
    for module in shallow:
        trained = {name: p.numel() for name, p in module.named_parameters() if p.requires_grad}
        assert trained and all(trained.values()), trained
    assert shallow[0].deep_text.numel() == shallow[0].visual_prompts.numel() == 0

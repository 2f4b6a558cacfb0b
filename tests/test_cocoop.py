"""CoCoOp: the meta-net's bias on the context, batched over images, its recipe and prompt file."""

from __future__ import annotations

import json

import pytest
import torch

from src.common.files import save_torch
from src.common.prompt_file import load_prompt
from src.methods.cocoop import CoCoOp
from src.methods.coop import CoOp
from src.run.training import train
from tests.conftest import make_cfg

CLASSNAMES = ["cat", "dog", "bird", "sports car", "golden_retriever"]


def images(clip, n: int = 6) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(n, 3, clip.image_size, clip.image_size)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_zero_meta_net_output_gives_coop(tiny_clip, position):
    torch.manual_seed(0)
    cocoop = CoCoOp(tiny_clip, CLASSNAMES, n_ctx=4, class_token_position=position)
    torch.nn.init.zeros_(cocoop.meta_net.linear2.weight)
    torch.nn.init.zeros_(cocoop.meta_net.linear2.bias)
    coop = CoOp(tiny_clip, CLASSNAMES, n_ctx=4, class_token_position=position)
    with torch.no_grad():
        coop.prompt_learner.ctx.copy_(cocoop.prompt_learner.ctx)
        expected, logits = coop(images(tiny_clip)), cocoop(images(tiny_clip))
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_each_image_gets_its_own_context_and_batching_does_not_change_it(tiny_clip):
    torch.manual_seed(0)
    cocoop = CoCoOp(tiny_clip, CLASSNAMES, ctx_init="a photo of a")
    assert cocoop.meta_net.linear1.in_features == 64 and cocoop.meta_net.linear1.out_features == 64 // 16
    assert cocoop.meta_net.linear2.out_features == tiny_clip.token_embedding.weight.shape[1]
    torch.nn.init.normal_(cocoop.meta_net.linear2.weight, std=0.5)
    batch = images(tiny_clip, 3)
    with torch.no_grad():
        logits = cocoop(batch)
        one_by_one = torch.cat([cocoop(image[None]) for image in batch])
        cocoop.prompts_per_pass = 2 * len(CLASSNAMES)  # two images per text-encoder pass
        chunked = cocoop(batch)
        coop = CoOp(tiny_clip, CLASSNAMES, ctx_init="a photo of a")
        unconditioned = coop(batch)
    torch.testing.assert_close(one_by_one, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked, logits, atol=1e-5, rtol=1e-5)
    assert (logits - unconditioned).abs().max() > 1e-3  # the bias changed the prompts


def test_context_and_meta_net_train_clip_does_not(tiny_clip):
    torch.manual_seed(0)
    cocoop = CoCoOp(tiny_clip, CLASSNAMES, n_ctx=4)
    loss = torch.nn.functional.cross_entropy(cocoop(images(tiny_clip)), torch.arange(6) % 5)
    loss.backward()
    trained = {name for name, p in cocoop.named_parameters() if p.grad is not None}
    assert trained == {"prompt_learner.ctx"} | {
        f"meta_net.{n}" for n, _ in cocoop.meta_net.named_parameters()
    }


def test_cocoop_needs_a_unified_context(tiny_clip):
    with pytest.raises(ValueError, match="use ctx=unified"):
        CoCoOp.create(tiny_clip, CLASSNAMES, class_specific=True)


def test_recipe_preset_run_and_prompt_file(tiny_overrides, tmp_path, tiny_clip):
    cfg = make_cfg(["dataset=oxford_pets", "method=cocoop", "shots=1", *tiny_overrides], tmp_path)
    assert (cfg.trainer.max_epochs, cfg.data.batch_size, cfg.ctx.n_ctx, cfg.ctx.init) == (
        10,
        1,
        4,
        "a photo of a",
    )
    assert cfg.method.optimizer.lr == 0.002
    cfg.trainer.max_epochs = 1
    results = train(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == results and saved["method"] == "cocoop" and saved["n_ctx"] == 4 and saved["epochs"] == 1
    assert saved["ctx_init_count"] == "words"
    state = load_prompt(tmp_path / "prompt.pt")
    assert state["method"] == "cocoop" and state["ctx"].shape == (4, 64)
    meta_net = {name.removeprefix("meta_net.") for name in state["weights"] if name.startswith("meta_net.")}
    assert meta_net == {"linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"}

    module = CoCoOp(tiny_clip, ["car", "plane", "ship"], n_ctx=4)
    save_torch(tmp_path / "other.pt", module.prompt_state())
    rebuilt = CoCoOp.from_prompt(load_prompt(tmp_path / "other.pt"), tiny_clip, ["apple", "pear"])
    assert rebuilt.prompt_learner.classnames == ["apple", "pear"]
    assert torch.equal(rebuilt.meta_net.linear1.weight, module.meta_net.linear1.weight)
    assert torch.equal(rebuilt.prompt_learner.ctx, module.prompt_learner.ctx)

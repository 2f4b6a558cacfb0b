"""CLIP-Adapter and TaskRes: zero-shot CLIP at their neutral settings, the residual's scale, training
that lowers the loss, rebuilding from the prompt file, a run, and TaskRes's class list."""

from __future__ import annotations

import math
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from src.methods.base import method_from_prompt
from src.methods.clip_adapter import CLIPAdapter
from src.methods.schedules import warmup_cosine
from src.methods.taskres import TaskRes
from src.methods.zeroshot import ZeroShotCLIP
from src.protocols import base_to_new
from src.run.config import compose_config
from src.run.evaluation import evaluate
from src.run.training import train
from tests.conftest import make_cfg, with_sgd

NAMES = ["abyssinian", "american_bulldog", "basset_hound", "bengal"]
TEMPLATE = "a photo of a {}, a type of pet."


def batch(tiny_clip, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Image features [n, d] (what the feature cache gives a method) and labels."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, tiny_clip.embed_dim, generator=generator), torch.arange(n) % len(NAMES)


def test_an_adapter_with_ratio_0_is_zero_shot_clip_exactly(tiny_clip):
    features, _ = batch(tiny_clip)
    zero_shot = ZeroShotCLIP(tiny_clip, NAMES, [TEMPLATE]).logits(features)
    torch.manual_seed(0)
    assert torch.equal(CLIPAdapter(tiny_clip, NAMES, TEMPLATE, ratio=0.0)(features), zero_shot)
    torch.manual_seed(0)
    adapter = CLIPAdapter(tiny_clip, NAMES, TEMPLATE)  # the official ratio, 0.2: the adapter is blended in
    assert (adapter(features) - zero_shot).abs().max() > 0.01
    d = tiny_clip.embed_dim
    trained = {name: tuple(p.shape) for name, p in adapter.named_parameters() if p.requires_grad}
    assert trained == {"adapter.0.weight": (d // 4, d), "adapter.2.weight": (d, d // 4)}  # no biases


def test_a_zero_residual_is_zero_shot_clip_and_the_base_is_the_raw_mean(tiny_clip):
    features, _ = batch(tiny_clip)
    taskres = TaskRes(tiny_clip, NAMES, [TEMPLATE])
    assert torch.equal(taskres.residual, torch.zeros(len(NAMES), tiny_clip.embed_dim))
    zero_shot = ZeroShotCLIP(tiny_clip, NAMES, [TEMPLATE]).logits(features)
    torch.testing.assert_close(taskres(features), zero_shot, rtol=0, atol=1e-5)
    # with several templates, the official base: the mean of the raw text features, not normalised
    templates = [TEMPLATE, "itap of a {}."]
    raw = [
        tiny_clip.encode_text(tiny_clip.tokenize([t.format(n.replace("_", " ")) for n in NAMES]))
        for t in templates
    ]
    base = TaskRes(tiny_clip, NAMES, templates).base_text_features()
    torch.testing.assert_close(base, (raw[0] + raw[1]) / 2)
    assert (base.norm(dim=-1) - 1).abs().min() > 0.1


def test_alpha_scales_the_residual(tiny_clip):
    residual = torch.randn(len(NAMES), tiny_clip.embed_dim, generator=torch.Generator().manual_seed(1))
    half, whole = (
        TaskRes(tiny_clip, NAMES, [TEMPLATE], alpha=0.5),
        TaskRes(tiny_clip, NAMES, [TEMPLATE], alpha=1),
    )
    with torch.no_grad():
        half.residual.copy_(residual)
        whole.residual.copy_(0.5 * residual)
    assert torch.equal(half.text_features(), whole.text_features())  # 0.5 x r is 1 x (0.5 r)
    expected = F.normalize(half.base_text_features() + 0.5 * residual, dim=-1)
    torch.testing.assert_close(half.text_features(), expected)
    with torch.no_grad():
        whole.residual.copy_(residual)
    assert (whole.text_features() - half.text_features()).abs().max() > 0.01


@pytest.mark.parametrize("method", [CLIPAdapter, TaskRes])
def test_training_lowers_the_loss_and_the_prompt_file_rebuilds_it(tiny_clip, method):
    features, labels = batch(tiny_clip)
    torch.manual_seed(0)
    # learning rates above the recipes' (0.002): 6 steps (4 epochs of 2) on random weights move it clearly
    if method is CLIPAdapter:
        module, lr = with_sgd(CLIPAdapter(tiny_clip, NAMES, TEMPLATE), lr=0.05), 0.05
    else:
        module, lr = TaskRes(tiny_clip, NAMES, [TEMPLATE]), 0.02
        module.use_recipe(partial(torch.optim.Adam, lr=lr, weight_decay=5e-4), partial(warmup_cosine))
    with torch.no_grad():
        before, loss_before = module(features), module.loss_terms(features, labels)["ce"]
    trainer = pl.Trainer(
        max_epochs=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        check_val_every_n_epoch=1,
        num_sanity_val_steps=0,
    )
    loader = DataLoader(TensorDataset(features, labels), batch_size=16)
    trainer.fit(module, loader, loader)  # validated every epoch
    assert 0 <= float(trainer.callback_metrics["val/acc"]) <= 1
    with torch.no_grad():
        after, loss_after = module(features), module.loss_terms(features, labels)["ce"]
    assert (after - before).abs().max() > 1e-3 and loss_after < loss_before - 1e-3
    # after the warm-up epoch and 3 of the cosine's 4 epochs: lr x (1 + cos(3 pi / 4)) / 2
    last = lr * (1 + math.cos(3 * math.pi / 4)) / 2
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == [pytest.approx(last)]
    rebuilt = method_from_prompt(module.prompt_state(), tiny_clip)
    assert type(rebuilt) is method and rebuilt.name == module.name
    with torch.no_grad():
        assert torch.equal(rebuilt(features), after)
    if method is CLIPAdapter:  # the adapter serves another class list: the new classes' logits
        other = method_from_prompt(module.prompt_state(), tiny_clip, ["siamese", "sphynx"], template="a {}.")
        assert other(features).shape == (len(features), 2) and other.template == "a {}."


def test_a_run_validates_saves_its_prompt_and_taskres_keeps_its_class_list(
    tiny_overrides, eval_overrides, tiny_clip, tmp_path
):
    run = tmp_path / "run"
    args = ["dataset=oxford_pets", "method=taskres", "shots=2", *tiny_overrides]
    cfg = make_cfg([*args, "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=1"], run)
    assert (cfg.data.batch_size, cfg.method.optimizer.lr, cfg.method.module.alpha) == (256, 2e-3, 0.5)
    assert cfg.method.optimizer._target_ == "torch.optim.Adam"
    trained = train(cfg)
    assert trained["method"] == "taskres" and trained["templates"] == [TEMPLATE] and trained["epochs"] == 2
    assert "val/acc" in (run / "csv" / "metrics.csv").read_text().splitlines()[0]
    eval_args = [f"ckpt={run / 'prompt.pt'}", "dataset=oxford_pets", *eval_overrides]
    same = evaluate(compose_config("eval", eval_args, tmp_path / "same"))
    assert same["test_acc"] == trained["test_acc"]
    with pytest.raises(ValueError) as refused:
        evaluate(compose_config("eval", [*eval_args, "dataset.subsample=new"], tmp_path / "new"))
    assert "taskres: its trained weights are one per class" in str(refused.value)
    assert "\n" not in str(refused.value)
    with pytest.raises(ValueError, match="method=taskres learns weights of the base classes only"):
        base_to_new(["oxford_pets"], [1], ["method=taskres", *tiny_overrides], tmp_path / "b2n")
    assert not (tmp_path / "b2n").exists()


def test_the_recipes(tiny_overrides, tmp_path):
    def recipe(method: str, dataset: str, *extra: str):
        return make_cfg([f"dataset={dataset}", f"method={method}", *tiny_overrides, *extra], tmp_path)

    epochs = [recipe("taskres", "dtd", f"shots={k}").trainer.max_epochs for k in (1, 2, 4, 8, 16)]
    assert epochs == [100, 100, 100, 200, 200]
    imagenet, flowers = recipe("taskres", "imagenet", "shots=1"), recipe("taskres", "oxford_flowers")
    assert (imagenet.method.optimizer.lr, imagenet.trainer.max_epochs, imagenet.method.module.alpha) == (
        2e-4,
        100,
        0.5,
    )
    assert (
        len(imagenet.method.module.templates) == 8
        and imagenet.method.module.templates[-1] == "a photo of a {}."
    )
    assert (flowers.method.module.alpha, flowers.method.optimizer.lr) == (1.0, 2e-3)
    adapter = recipe("clip_adapter", "dtd", "shots=1")
    module, optimizer = adapter.method.module, adapter.method.optimizer
    assert (adapter.data.batch_size, adapter.trainer.max_epochs, module.template) == (32, 50, "{} texture.")
    assert (module.ratio, module.reduction, optimizer.lr, optimizer.momentum, optimizer.weight_decay) == (
        0.2,
        4,
        0.002,
        0.9,
        5e-4,
    )

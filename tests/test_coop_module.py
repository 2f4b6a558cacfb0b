"""The training module: only the context learns, CLIP stays frozen and in eval mode, the recipe's
schedule, and checkpoints that hold the context only."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from src.methods.coop import CoOp
from src.methods.schedules import warmup_cosine_factors
from tests.conftest import with_sgd

CLASSNAMES = ["cat", "dog", "bird"]


def make_module(clip, lr: float = 0.002, warmup_epochs: int = 1, **kwargs) -> CoOp:
    torch.manual_seed(0)
    return with_sgd(CoOp(clip, CLASSNAMES, n_ctx=4, **kwargs), lr=lr, warmup_epochs=warmup_epochs)


def batches(clip, n: int = 8) -> DataLoader:
    torch.manual_seed(0)
    images = torch.randn(n, 3, clip.image_size, clip.image_size)
    return DataLoader(TensorDataset(images, torch.arange(n) % 3), batch_size=4)


def fit(module, loader, tmp_path, epochs: int = 1) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=loader)
    return trainer


@pytest.mark.parametrize("class_specific", [False, True])
def test_one_optimizer_step_changes_only_the_context(tiny_clip, class_specific):
    module = make_module(tiny_clip, class_specific=class_specific, lr=0.1, warmup_epochs=0)
    clip_before = {k: v.clone() for k, v in module.clip.state_dict().items()}
    ctx_before = module.prompt_learner.ctx.detach().clone()
    optimizer = torch.optim.SGD(module.prompt_learner.parameters(), lr=0.1)
    images, labels = next(iter(batches(tiny_clip)))
    loss = torch.nn.functional.cross_entropy(module(images), labels)
    loss.backward()
    grads = [n for n, p in module.named_parameters() if p.grad is not None]
    assert grads == ["prompt_learner.ctx"]
    optimizer.step()
    assert not torch.equal(module.prompt_learner.ctx.detach(), ctx_before)
    for key, value in module.clip.state_dict().items():
        assert torch.equal(value, clip_before[key]), key


def test_clip_stays_frozen_and_in_eval_mode_through_training(tiny_clip, tmp_path):
    module = make_module(tiny_clip)
    clip_before = {k: v.clone() for k, v in module.clip.state_dict().items()}
    module.train()
    assert not module.clip.training
    assert all(not m.training for m in module.clip.modules())
    assert all(not p.requires_grad for p in module.clip.parameters())
    fit(module, batches(tiny_clip), tmp_path, epochs=2)
    assert not any(m.training for m in module.clip.modules())
    for key, value in module.clip.state_dict().items():
        assert torch.equal(value, clip_before[key]), key


def test_warmup_then_cosine_per_epoch():
    factor = warmup_cosine_factors(lr=0.002, warmup_lr=1e-5, warmup_epochs=1, epochs=10)
    lrs = [0.002 * factor(e) for e in range(10)]
    assert lrs[0] == pytest.approx(1e-5)
    for e in range(1, 10):
        assert lrs[e] == pytest.approx(0.001 * (1 + math.cos(math.pi * (e - 1) / 10)))
    assert lrs[1] == pytest.approx(0.002)
    with pytest.raises(ValueError, match=r"method.optimizer.lr=0: the learning rate must be positive"):
        warmup_cosine_factors(lr=0, warmup_lr=1e-5, warmup_epochs=1, epochs=10)


def test_scheduler_steps_once_per_epoch(tiny_clip, tmp_path):
    module = make_module(tiny_clip)
    trainer = fit(module, batches(tiny_clip), tmp_path, epochs=3)
    (optimizer,) = trainer.optimizers
    group = optimizer.param_groups[0]
    assert group["momentum"] == 0.9 and group["weight_decay"] == 5e-4
    # after epochs 0, 1, 2 the scheduler has stepped 3 times: lr(3) of the cosine
    assert group["lr"] == pytest.approx(0.001 * (1 + math.cos(math.pi * 2 / 3)))


def test_checkpoints_hold_the_context_only(tiny_clip, tmp_path):
    module = make_module(tiny_clip)
    trainer = fit(module, batches(tiny_clip), tmp_path)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert list(checkpoint["state_dict"]) == ["prompt_learner.ctx"]
    assert path.stat().st_size < 100_000
    restored = make_module(tiny_clip)
    restored.load_state_dict(checkpoint["state_dict"], strict=False)
    assert torch.equal(restored.prompt_learner.ctx, module.prompt_learner.ctx)
    state = module.prompt_state()
    assert state["classnames"] == CLASSNAMES and state["backbone"] == "coop-tiny"


def test_test_metrics_are_top1_and_macro_accuracy(tiny_clip, tmp_path):
    module = make_module(tiny_clip)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    loader = batches(tiny_clip, n=9)
    (metrics,) = trainer.test(module, dataloaders=loader, verbose=False)
    images, labels = loader.dataset.tensors
    with torch.no_grad():
        predictions = module(images).argmax(-1)
    correct = (predictions == labels).float()
    assert metrics["test/acc"] == pytest.approx(correct.mean().item())
    per_class = [correct[labels == c].mean().item() for c in range(3)]
    assert metrics["test/macro_acc"] == pytest.approx(sum(per_class) / 3)


def test_prompt_file_round_trip_and_transfer(tiny_clip, tmp_path):
    from src.common.files import save_torch
    from src.common.prompt_file import load_prompt
    from src.methods.coop import CoOp

    module = make_module(tiny_clip)
    save_torch(tmp_path / "prompt.pt", module.prompt_state())
    state = load_prompt(tmp_path / "prompt.pt")
    same = CoOp.from_prompt(state, tiny_clip)
    assert torch.equal(same.prompt_learner.ctx, module.prompt_learner.ctx)
    other = CoOp.from_prompt(state, tiny_clip, classnames=["car", "plane"])
    assert other.prompt_learner.n_cls == 2
    csc = make_module(tiny_clip, class_specific=True)
    with pytest.raises(ValueError, match="class-specific context only applies"):
        CoOp.from_prompt(csc.prompt_state(), tiny_clip, classnames=["car", "plane"])


def test_prompt_file_keeps_the_fixed_words_of_a_word_initialised_context(tiny_clip):

    torch.manual_seed(0)
    module = make_module(tiny_clip, ctx_init="itap of a")  # "it ap of" learned, "a" fixed text
    with torch.no_grad():
        module.prompt_learner.ctx.add_(torch.randn_like(module.prompt_learner.ctx))  # as if trained
        state = module.prompt_state()
        assert state["n_ctx"] == 3 and state["ctx_init_count"] == "words"
        torch.testing.assert_close(CoOp.from_prompt(state, tiny_clip).text_features(), module.text_features())
        # a file from before ctx_init_count: every token of the phrase was learned
        old = make_module(tiny_clip, ctx_init="itap of a", ctx_init_count="tokens").prompt_state()
        del old["ctx_init_count"]
        assert CoOp.from_prompt(old, tiny_clip).prompt_learner.n_ctx == 4

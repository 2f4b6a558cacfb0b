"""Mixed precision: autocast with the context kept in fp32, and a NaN loss stops the run."""

from __future__ import annotations

import pytest
import torch

from src.run.callbacks import NonFiniteLossError
from src.run.cli import user_error
from src.run.training import train
from tests.conftest import make_cfg


def test_gpu_presets_choose_bf16_or_fp16_autocast(tmp_path):
    bf16 = make_cfg(["dataset=oxford_pets", "trainer=gpu"], tmp_path).trainer
    fp16 = make_cfg(["dataset=oxford_pets", "trainer=gpu", "trainer.precision=16-mixed"], tmp_path).trainer
    assert (bf16.accelerator, bf16.precision) == ("gpu", "bf16-mixed")
    assert (fp16.accelerator, fp16.precision) == ("gpu", "16-mixed")


def test_bf16_autocast_trains_an_fp32_context(tiny_overrides, tmp_path):
    cfg = make_cfg(
        [
            "dataset=oxford_pets",
            "shots=2",
            "trainer.max_epochs=2",
            *tiny_overrides,
            "trainer.precision=bf16-mixed",
        ],
        tmp_path,
    )
    results = train(cfg)
    assert results["precision"] == "bf16-mixed" and 0 <= results["test_acc"] <= 100
    ctx = torch.load(tmp_path / "prompt.pt", weights_only=True)["ctx"]
    assert ctx.dtype == torch.float32 and torch.isfinite(ctx).all()
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert last["prompt_learner.ctx"].dtype == torch.float32


def test_non_finite_loss_stops_the_run_with_one_clear_line(tiny_overrides, tmp_path):
    # lr = nan: the first step is finite, its update makes the context NaN, the second loss is NaN
    cfg = make_cfg(
        ["dataset=oxford_pets", "shots=2", "trainer.max_epochs=3", *tiny_overrides, "method.optimizer.lr=nan"],  # noqa: E501
        tmp_path,
    )
    with pytest.raises(NonFiniteLossError) as caught:
        train(cfg)
    message = user_error(caught.value)
    assert message == (
        "training loss is nan at epoch 1, batch 0 (precision 32-true): the run stopped; try "
        "trainer.precision=bf16-mixed or 32-true, or a lower method.optimizer.lr"
    )
    assert not (tmp_path / "results.json").exists()

"""Determinism: the same command twice trains on the same few-shot images and gives the same context
and metrics on CPU, whether the image features were computed or read from the cache."""

from __future__ import annotations

import json

import torch

from src.run.training import train
from tests.conftest import make_cfg


def test_the_same_command_twice_gives_the_same_subset_context_and_metrics(tiny_overrides, tmp_path):
    args = [
        "dataset=oxford_pets",
        "shots=2",
        "data.batch_size=4",  # several steps per epoch: the random data order matters
        "trainer.max_epochs=3",
        "trainer.check_val_every_n_epoch=1",  # features of the val images before training goes on
        *tiny_overrides,
        f"paths.cache_dir={tmp_path / 'cache'}",  # the first run computes the features, the second reads them
    ]
    first = train(make_cfg(args, tmp_path / "first"))
    second = train(make_cfg(args, tmp_path / "second"))

    subsets = [json.loads((tmp_path / run / "fewshot.json").read_text()) for run in ("first", "second")]
    assert subsets[0]["train"] == subsets[1]["train"] and len(subsets[0]["train"]) == 4 * 2
    assert subsets[0]["val"] == subsets[1]["val"]
    ctx = [torch.load(tmp_path / run / "prompt.pt", weights_only=True)["ctx"] for run in ("first", "second")]
    assert torch.equal(ctx[0], ctx[1])
    first.pop("train_time_s"), second.pop("train_time_s")
    assert first == second
    metrics = [(tmp_path / run / "csv" / "metrics.csv").read_text() for run in ("first", "second")]
    assert metrics[0] == metrics[1] and "val/acc" in metrics[0]

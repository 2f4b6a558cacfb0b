"""The training run's random streams are the training's own: validating every epoch, every few
epochs or never, testing zero-shot CLIP first, computing or reading the image features give the
same context, bit for bit on CPU, and the same test accuracy (the original code never validates;
a run here must still be its run)."""

from __future__ import annotations

import pytest
import torch

from src.run.training import train
from tests.conftest import make_cfg

# What a run may do besides training; the last is the original's run: no validation at all.
SETTINGS = {
    "validate_every_epoch": ["trainer.check_val_every_n_epoch=1"],
    "validate_every_2_epochs": ["trainer.check_val_every_n_epoch=2"],
    "baseline_features_computed": [
        "trainer.check_val_every_n_epoch=1",
        "baseline=zeroshot",
        "data.cache_features=false",
    ],
    "never_validate": ["trainer.check_val_every_n_epoch=1000"],
}


@pytest.mark.parametrize(
    "method_args",
    [["ctx=unified"], ["ctx=class_specific"], ["method=kgcoop", "trainer.max_epochs=4"]],
    ids=["coop_unified", "coop_class_specific", "kgcoop"],
)
def test_what_is_not_training_leaves_the_training_run_as_it_is(method_args, tiny_overrides, tmp_path):
    args = [
        "dataset=oxford_pets",
        "shots=2",
        "ctx.n_ctx=4",
        "data.batch_size=4",  # several steps per epoch: the data order matters
        "trainer.max_epochs=4",
        *method_args,
        *tiny_overrides,
    ]
    results, contexts = {}, {}
    for name, settings in SETTINGS.items():
        out = tmp_path / name
        results[name] = train(make_cfg([*args, *settings], out))
        contexts[name] = torch.load(out / "prompt.pt", weights_only=True)["ctx"]
        validated = "val/acc" in (out / "csv" / "metrics.csv").read_text()
        assert validated == (name != "never_validate")
    for name in SETTINGS:
        assert torch.equal(contexts[name], contexts["never_validate"]), name
        assert results[name]["test_acc"] == results["never_validate"]["test_acc"], name

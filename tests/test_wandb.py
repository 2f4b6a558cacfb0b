"""W&B logging (`logger=wandb`), offline: what a run logs, and that no API key is written."""

from __future__ import annotations

import json

import pytest

from src.run.resume import ContinuedWandbLogger
from src.run.training import train
from tests.conftest import make_cfg
from tests.wandb_records import finished_records

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"


def test_offline_run_logs_config_losses_accuracies_and_no_key(tiny_overrides, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    out = tmp_path / "run"
    cfg = make_cfg(
        [
            "dataset=oxford_pets",
            "shots=2",
            "seed=3",
            "logger=wandb",
            "trainer.max_epochs=3",
            "trainer.check_val_every_n_epoch=1",
            "trainer.log_every_n_steps=1",  # the loss and learning rate of every step
            *tiny_overrides,
        ],
        out,
    )
    results = train(cfg)

    (log_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    records = finished_records(log_file)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.run_group == "oxford_pets-coop-coop-tiny-unified-m16-end-2shot"
    assert run.display_name == "oxford_pets-coop-unified-2shot-seed3"
    assert set(run.tags) == {"oxford_pets", "coop", "coop-tiny", "unified", "end", "2shot"}

    config = {
        item.key: json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "config"
        for item in r.config.update
    }
    # the resolved config of the run, and the module's own hyperparameters
    assert config["dataset"]["name"] == "oxford_pets" and config["trainer"]["max_epochs"] == 3
    assert config["seed"] == 3 and config["logger"]["wandb"]["project"] == "coop"
    assert config["classnames"] == ["abyssinian", "american_bulldog", "basset_hound", "bengal"]

    history = [
        {item.key or "/".join(item.nested_key): item.value_json for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    losses = [h["train/loss"] for h in history if "train/loss" in h]
    lrs = [float(h["lr-SGD"]) for h in history if "lr-SGD" in h]
    accs = [h["val/acc"] for h in history if "val/acc" in h]
    steps = 3 * 1  # 8 images, batch 32: one step per epoch
    assert len(losses) == steps and len(lrs) == steps and len(accs) == 3
    assert lrs[0] == pytest.approx(1e-5) and lrs[1] == pytest.approx(0.002)  # warm-up, then cosine
    test_acc = next(float(h["test/acc"]) for h in history if "test/acc" in h)
    assert 100 * test_acc == pytest.approx(results["test_acc"])
    summary_keys = {
        item.key or "/".join(item.nested_key)
        for r in records
        if r.WhichOneof("record_type") == "summary"
        for item in r.summary.update
    }
    assert {"test/acc", "test/macro_acc", "train/loss", "val/acc"} <= summary_keys

    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 10
    assert not [p for p in written if FAKE_KEY.encode() in p.read_bytes()]


def test_a_resumed_run_logs_into_the_same_wandb_run(tmp_path, monkeypatch):
    """The W&B id is kept in the run's folder when its W&B run starts: the same command, resumed,
    continues that W&B run; a run in an emptied folder starts a new one."""
    monkeypatch.setenv("WANDB_MODE", "disabled")  # nothing is logged: the id is what is tested
    first = ContinuedWandbLogger(project="coop", save_dir=str(tmp_path))
    run_id = first._wandb_init["id"]
    assert not (tmp_path / ContinuedWandbLogger.ID_FILE).exists()  # nothing written before it starts
    first.experiment  # noqa: B018  (the W&B run starts)
    assert (tmp_path / ContinuedWandbLogger.ID_FILE).read_text().strip() == run_id
    resumed = ContinuedWandbLogger(project="coop", save_dir=str(tmp_path))
    assert resumed._wandb_init["id"] == run_id and resumed._wandb_init["resume"] == "allow"
    (tmp_path / ContinuedWandbLogger.ID_FILE).unlink()
    assert ContinuedWandbLogger(project="coop", save_dir=str(tmp_path))._wandb_init["id"] != run_id

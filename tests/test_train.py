"""The training entry point: config composition, the run's files, the quick start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from src.run.config import as_hydra_overrides
from src.run.training import train
from tests.conftest import make_cfg

ROOT = Path(__file__).resolve().parents[1]
RESULT_KEYS = {
    "dataset",
    "method",
    "shots",
    "seed",
    "ctx",
    "n_ctx",
    "ctx_init_count",
    "class_token_position",
    "backbone",
    "pretrained",
    "test_acc",
    "test_macro_acc",
    "num_test",
    "train_time_s",
    "fewshot_sampler",
    "fewshot_source",
}


def test_paper_recipe_is_the_default(tmp_path):
    cfg = make_cfg(["dataset=oxford_pets", "shots=8"], tmp_path)
    assert cfg.model.name == "RN50-quickgelu" and cfg.model.pretrained == "openai"
    assert cfg.method.optimizer._target_ == "torch.optim.SGD"
    assert cfg.method.optimizer.lr == 0.002 and cfg.method.optimizer.momentum == 0.9
    assert cfg.method.optimizer.weight_decay == 5e-4 and cfg.method.scheduler.warmup_lr == 1e-5
    assert cfg.data.batch_size == 32 and cfg.data.test_batch_size == 100
    assert cfg.ctx.n_ctx == 16 and cfg.ctx.class_token_position == "end"
    assert cfg.trainer.max_epochs == 200
    epochs = {
        s: make_cfg(["dataset=oxford_pets", f"shots={s}"], tmp_path).trainer.max_epochs for s in (1, 2, 4, 16)
    }
    assert epochs == {1: 50, 2: 100, 4: 100, 16: 200}
    assert make_cfg(["dataset=oxford_pets", "trainer=cpu"], tmp_path).trainer.precision == "32-true"
    assert make_cfg(["dataset=oxford_pets", "trainer=gpu"], tmp_path).trainer.precision == "bf16-mixed"


def test_class_specific_run_writes_results_prompt_and_config(tiny_overrides, tmp_path):
    cfg = make_cfg(
        ["dataset=oxford_pets", "ctx=class_specific", "shots=8", "trainer.max_epochs=2", *tiny_overrides],
        tmp_path,
    )
    results = train(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == results
    assert RESULT_KEYS <= set(saved)
    assert saved["ctx"] == "class_specific" and saved["method"] == "coop" and saved["shots"] == 8
    assert saved["ctx_init_count"] is None  # no ctx.init
    assert saved["fewshot_sampler"] == "reference" and saved["fewshot_source"] is None  # drawn here
    assert saved["num_test"] == 16 and saved["num_train"] == 4 * 8
    assert 0 <= saved["test_acc"] <= 100 and saved["epochs"] == 2
    prompt = torch.load(tmp_path / "prompt.pt", weights_only=True)
    assert prompt["ctx"].shape == (4, 16, 64) and prompt["class_specific"] is True
    assert prompt["classnames"] == ["abyssinian", "american_bulldog", "basset_hound", "bengal"]
    assert (tmp_path / "prompt.pt").stat().st_size < 50_000
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert list(last["state_dict"]) == ["prompt_learner.ctx"]
    assert "ctx: class_specific" not in (tmp_path / "config.yaml").read_text()
    assert "class_specific: true" in (tmp_path / "config.yaml").read_text()


def test_quickstart_trains_offline_on_textile(cache_dir, tmp_path):
    """The README's quick start, shortened: the same command and config, fewer epochs."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "src.train",
            "experiment=quickstart_textile",
            "trainer.max_epochs=3",
            "data.num_workers=0",
            f"paths.cache_dir={cache_dir}",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["dataset"] == "textile" and results["backbone"] == "coop-tiny"
    assert results["num_test"] == 600 and results["num_classes"] == 3
    assert "test accuracy" in run.stdout + run.stderr


def test_numeric_shots_select_the_shots_files():
    assert as_hydra_overrides(["shots=8", "seed=2"]) == ["shots='8'", "seed=2"]
    assert as_hydra_overrides(["shots=1,2,16"]) == ["shots='1','2','16'"]
    assert as_hydra_overrides(["data.shots=8"]) == ["data.shots=8"]
    # DePT's base, a group inside method/: the dotted spelling chooses it as the slash does
    assert as_hydra_overrides(["method.base=maple", "method.module.lr=1"]) == [
        "method/base=maple",
        "method.module.lr=1",
    ]

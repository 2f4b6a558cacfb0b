"""Multi-device runs: `trainer=ddp_cpu` (2 processes) agrees with one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl

from src.run.training import train
from tests.conftest import make_cfg
from tests.miniature import make_oxford_pets

ROOT = Path(__file__).resolve().parents[1]


class SaveTrainItems(pl.Callback):
    """Writes the few-shot training images each rank trains on (added to the DDP run's callbacks)."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        paths = [item.path for item in trainer.datamodule.train_items]
        (self.dirpath / f"rank{trainer.global_rank}.json").write_text(json.dumps(paths))


@pytest.fixture
def odd_test_set(tmp_path: Path) -> Path:
    """Pets with 15 test images: 2 ranks get 8 and 7, and a padded sampler would repeat one."""
    root = make_oxford_pets(tmp_path / "data")
    split_file = root / "split_zhou_OxfordPets.json"
    split = json.loads(split_file.read_text())
    split["test"] = split["test"][:-1]
    split_file.write_text(json.dumps(split))
    return tmp_path / "data"


def test_two_processes_give_the_accuracy_of_one(odd_test_set, tmp_path):
    args = [
        "dataset=oxford_pets",
        "model=tiny",
        "shots=2",
        "trainer.max_epochs=1",
        f"paths.data_dir={odd_test_set}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "data.num_workers=0",
        "trainer.enable_progress_bar=false",
    ]
    ddp_dir = tmp_path / "ddp"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "src.train",
            *args,
            "trainer=ddp_cpu",
            f"hydra.run.dir={ddp_dir}",
            f"+callbacks.save_train_items._target_={__name__}.SaveTrainItems",
            f"+callbacks.save_train_items.dirpath={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    single = train(make_cfg([*args, "trainer=cpu"], tmp_path / "single"))

    ddp = json.loads((ddp_dir / "results.json").read_text())
    assert ddp["num_test"] == single["num_test"] == 15
    # metrics summed over both ranks' shares, no image counted twice: k / 15, as with one process
    assert round(ddp["test_acc"] * 15 / 100, 4) == round(ddp["test_acc"] * 15 / 100)
    assert ddp["test_acc"] == pytest.approx(single["test_acc"], abs=1e-4)
    assert ddp["test_macro_acc"] == pytest.approx(single["test_macro_acc"], abs=1e-4)
    # both ranks trained on the same few-shot subsets, the one a single process draws
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1 and len(rank0) == 4 * 2
    single_train = json.loads((tmp_path / "single" / "fewshot.json").read_text())["train"]
    assert [str(odd_test_set / "oxford_pets" / path) for path, _, _ in single_train] == rank0
    # rank 0 alone writes the results
    assert "test accuracy" in (ddp_dir / "train.log").read_text()
    assert "test accuracy" not in (ddp_dir / "train_ddp_process_1.log").read_text()

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from src.models.clip import FrozenCLIP
from tests.miniature import make_oxford_pets

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_clip() -> FrozenCLIP:
    torch.manual_seed(0)
    return FrozenCLIP("coop-tiny", None)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_oxford_pets(root)
    return root


def make_cfg(overrides: list[str], output_dir: Path) -> DictConfig:
    """The training config as `python -m src.train <overrides>` would compose it."""
    from src.train import quote_numeric_choices  # also registers the config resolvers

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=quote_numeric_choices(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture
def tiny_overrides(data_dir: Path) -> list[str]:
    return [
        "model=tiny",
        "trainer=cpu",
        f"paths.data_dir={data_dir}",
        "data.num_workers=0",
        "trainer.enable_progress_bar=false",
    ]

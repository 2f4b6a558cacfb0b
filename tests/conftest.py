from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
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
    from src.run.config import as_hydra_overrides  # also registers the config resolvers

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=as_hydra_overrides(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def with_sgd(
    module: Any, lr: float = 0.002, momentum: float = 0.9, weight_decay: float = 5e-4, **schedule: Any
) -> Any:
    """A method built by hand, given CoOp's recipe (conf/method/coop.yaml: SGD, warm-up and cosine),
    with these values."""
    from functools import partial

    from src.methods.schedules import warmup_cosine

    optimizer = partial(torch.optim.SGD, lr=lr, momentum=momentum, weight_decay=weight_decay)
    module.use_recipe(optimizer, partial(warmup_cosine, **schedule))
    return module


def run_clip(seed: int = 1) -> FrozenCLIP:
    """The random-weight tiny CLIP of a run of `seed` (model=tiny), as the run builds it."""
    torch.manual_seed(seed)
    return FrozenCLIP("coop-tiny", None)


def caches_features(cfg: DictConfig) -> bool:
    """Whether the run of `cfg` reads cached image features: data.cache_features, unless its method
    needs raw images, which the run then turns off (src/run/checks.py, `use_images`)."""
    from src.methods.base import method_arguments, method_class

    method = method_class(cfg.method)
    return bool(cfg.data.cache_features) and not method.needs_images_for(
        method_arguments(method, cfg.method.module)
    )


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """`cli(main, args)` runs an entry point as `python -m src.<name> <args>` would, in this process."""
    from src.run.cli import run

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setenv("HYDRA_MAIN_MODULE", "__main__")  # find conf/ beside the entry point, as `-m` does

    def call(main: Callable[[], Any], args: list[str]) -> None:
        # Hydra leaves the test session's logging alone
        logging_off = ["hydra/job_logging=none", "hydra/hydra_logging=none"]
        monkeypatch.setattr(sys, "argv", [main.__module__, *args, *logging_off])
        try:
            run(main)
        finally:
            GlobalHydra.instance().clear()

    return call


@pytest.fixture
def offline_without_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub is offline (HF_HUB_OFFLINE) and open_clip may not load any weights: a test fails if
    it does (checks that must pass or fail before any weights load)."""

    def no_weights(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("open_clip was asked to load weights")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(open_clip, "create_model", no_weights)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The feature cache of the test session (features of equal keys are equal: sharing is safe)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def tiny_overrides(data_dir: Path, cache_dir: Path) -> list[str]:
    return [
        "model=tiny",
        "trainer=cpu",
        f"paths.data_dir={data_dir}",
        f"paths.cache_dir={cache_dir}",
        "data.num_workers=0",
        "trainer.enable_progress_bar=false",
    ]


@pytest.fixture
def eval_overrides(tiny_overrides: list[str]) -> list[str]:
    """src.eval on the miniature datasets: the backbone is the prompt's own (model=from_ckpt)."""
    return [o for o in tiny_overrides if o != "model=tiny"]

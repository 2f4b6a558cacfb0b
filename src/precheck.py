"""What a training run checks before anything slow (loading or downloading CLIP's weights, reading
the images): its run folder, its options, its data folder and split file, whether its weights can
be had. Every check runs, and every mistake found is reported at once, a line each."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from hydra.utils import instantiate
from omegaconf import DictConfig

from src.cli import UserErrors, user_error
from src.data.datamodule import FewShotDataModule
from src.models.clip import check_architecture
from src.models.prompt_learner import check_context
from src.models.weights import check_weights
from src.resume import check_run_dir

T = TypeVar("T")


class Checks:
    """Runs checks to the end, keeping the user's mistakes (src.cli.user_error) and letting bugs
    through; `raise_mistakes` then raises the one mistake as it was, or several as UserErrors."""

    def __init__(self) -> None:
        self.mistakes: list[tuple[Exception, str]] = []

    def run(self, check: Callable[[], T]) -> T | None:
        try:
            return check()
        except Exception as err:
            message = user_error(err)
            if message is None:
                raise
            self.mistakes.append((err, message))
            return None

    def raise_mistakes(self) -> None:
        if len(self.mistakes) == 1:
            raise self.mistakes[0][0]
        if self.mistakes:
            raise UserErrors([message for _, message in self.mistakes]) from self.mistakes[0][0]


def check_training_run(cfg: DictConfig, out: Path) -> FewShotDataModule:
    """The data module of the run, once the run folder, options, data and weights pass their checks.

    Its image size is the default until the backbone is built (`image_size` is only used by the
    loaders)."""
    checks = Checks()
    checks.run(lambda: check_run_dir(cfg, out))
    module = cfg.method.get("module") or {}
    if "n_ctx" in module:
        position = module.get("class_token_position", "end")
        checks.run(lambda: check_context(module.n_ctx, module.get("ctx_init"), position))
    model = cfg.model

    def check_backbone() -> None:  # the weights of a known architecture only
        check_architecture(model.name)
        check_weights(model.name, model.get("pretrained"), model.get("cache_dir"))

    checks.run(check_backbone)
    datamodule = checks.run(lambda: instantiate(cfg.data, dataset=instantiate(cfg.dataset.reader)))
    if datamodule is not None:
        checks.run(lambda: datamodule.classnames)  # reads the data folder and its split file
    checks.raise_mistakes()
    return datamodule

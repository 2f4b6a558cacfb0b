"""What a training run checks before it claims its run folder and before anything slow (loading or
downloading CLIP's weights, training): the folder and its checkpoint, the options, the method
against the backbone's architecture, the weights, the devices, the data (its folder, split file,
few-shot subsets and images) and the feature cache. Every check runs, and every mistake found is
reported at once, a line each; the folder stays unclaimed, so the corrected command runs there."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import open_clip
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, open_dict

from src.common.messages import one_of, override
from src.common.prompt_file import LAST_CHECKPOINT
from src.data.datamodule import FewShotDataModule
from src.methods.base import Method, check_options, method_arguments, method_class, recipe_factories
from src.methods.schedules import RunLength
from src.models.clip import Architecture
from src.models.prompt_learner import check_prompts_fit
from src.models.text_encoder import check_text_path
from src.models.weights import check_weights
from src.run.cli import UserErrors, user_error
from src.run.config import check_recipe_places
from src.run.resume import AtomicCheckpointIO, check_run_dir

T = TypeVar("T")


class Checks:
    """Runs checks to the end, keeping the user's mistakes (src.run.cli.user_error) and letting bugs
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

    def passed(self, check: Callable[[], Any]) -> bool:
        """Runs `check` as `run` does; whether it found no mistake."""
        before = len(self.mistakes)
        self.run(check)
        return len(self.mistakes) == before

    def raise_mistakes(self) -> None:
        if len(self.mistakes) == 1:
            raise self.mistakes[0][0]
        if self.mistakes:
            raise UserErrors([message for _, message in self.mistakes]) from self.mistakes[0][0]


@dataclass
class CheckedRun:
    """What the checks built on the way, for the run to use: the data module, its few-shot subsets
    selected (image size the default until the backbone is built: only the loaders use it), and
    the trainer."""

    datamodule: FewShotDataModule
    trainer: pl.Trainer


def check_training_run(cfg: DictConfig, out: Path) -> CheckedRun:
    """The run's data module and trainer, once every check has passed (else its mistakes, at once)."""
    checks = Checks()
    checks.run(lambda: check_run_dir(cfg, out))
    checks.run(lambda: check_baseline(cfg.get("baseline")))
    model = cfg.model
    architecture = checks.run(lambda: Architecture.of(model.name))
    method = checks.run(lambda: method_class(cfg.method))
    args = checks.run(lambda: method_arguments(method, cfg.method.module)) if method else None
    if args is not None and architecture is not None:
        checks.run(lambda: check_options(method, args, architecture))
    checks.run(lambda: check_recipe(cfg.method))
    if args is not None and checks.run(lambda: method.needs_images_for(args)):
        checks.run(lambda: use_images(cfg))
    if architecture is not None:  # the weights of a known architecture only
        checks.run(lambda: check_weights(model.name, model.get("pretrained"), model.get("cache_dir")))
    checks.run(lambda: check_text_path(model.get("text_path", "auto")))
    trainer = checks.run(lambda: build_trainer(cfg))
    datamodule = checks.run(lambda: instantiate(cfg.data, dataset=instantiate(cfg.dataset.reader)))
    if datamodule is not None:
        selected = checks.passed(lambda: check_data(datamodule, method))
        if selected and (out / LAST_CHECKPOINT).is_file():  # a run that continues: on the same images
            checks.run(datamodule.check_resumed)
        if selected and args is not None and architecture is not None:
            checks.run(lambda: check_context_fits(model.name, datamodule.classnames, args))
        if datamodule.cache is not None:
            checks.run(datamodule.cache.check_writable)
    checks.raise_mistakes()
    return CheckedRun(datamodule, trainer)


def check_recipe(method_cfg: DictConfig) -> None:
    """The method's recipe: only keys that a setting reads (`RECIPE_PLACES`), and an optimiser and
    schedule that build (tried on one parameter): a wrong target or value is one line naming
    method.optimizer or method.scheduler, before the run folder is claimed."""
    check_recipe_places(method_cfg)
    try:
        optimizer, scheduler = recipe_factories(method_cfg)
    except Exception as err:  # Hydra's InstantiationException wraps the cause
        raise ValueError(f"method.optimizer / method.scheduler do not build: {root_cause(err)}") from err
    if optimizer is None:
        return
    try:
        built = optimizer([torch.zeros(1, requires_grad=True)])
    except Exception as err:  # torch's own checks (lr, momentum, betas ...) or a wrong argument
        raise ValueError(f"method.optimizer: {root_cause(err)}") from err
    if scheduler is not None:
        try:
            scheduler(built, RunLength(epochs=1, steps=1))
        except Exception as err:
            raise ValueError(f"method.scheduler: {root_cause(err)}") from err


def root_cause(err: BaseException) -> str:
    """The innermost error's message, on one line."""
    while err.__cause__ is not None:
        err = err.__cause__
    return " ".join(str(err).split())


def check_baseline(baseline: str | None) -> None:
    if baseline not in (None, "zeroshot"):
        raise ValueError(one_of("baseline", baseline, ("zeroshot", None), "null: no baseline"))


def use_images(cfg: DictConfig) -> None:
    """A method that needs raw images (`Method.needs_images`) is never given cached image features:
    the feature cache is off for its run (config.yaml says so) and cached train views are refused."""
    if cfg.data.get("train_views"):
        raise ValueError(
            f"data.train_views={cfg.data.train_views}: method={cfg.method.name} needs raw images, not "
            "views cached from the frozen image encoder; use data.train_views=0"
        )
    with open_dict(cfg):
        cfg.data.cache_features = False


def check_data(datamodule: FewShotDataModule, method: type[Method] | None) -> None:
    """The data folder, its split file, the few-shot subsets (drawn, or read from data.fewshot_file
    or the reference's pickle) and their images: what `setup` would refuse once training starts."""
    datamodule.select()
    if method is None or method.trains:
        datamodule.require_training_images()


def check_context_fits(model_name: str, classnames: list[str], args: dict[str, Any]) -> None:
    """A learned context's prompts (context, class name, period) fit the text encoder: what the
    prompt learner would refuse, found before anything loads (the tokenizer needs no weights)."""
    if "n_ctx" not in args:
        return
    init = (args.get("ctx_init") or "").replace("_", " ").strip()
    prefix = init or " ".join(["X"] * int(args["n_ctx"]))
    prompts = [f"{prefix} {name.replace('_', ' ')}." for name in classnames]
    fix = f"use fewer context vectors (ctx.n_ctx={args['n_ctx']} now)" if not init else "a shorter ctx.init"
    check_prompts_fit(open_clip.get_tokenizer(model_name), prompts, classnames, fix)


def build_trainer(cfg: DictConfig) -> pl.Trainer:
    """The run's Lightning Trainer, with its callbacks and loggers; devices that Lightning cannot
    use here are one line naming the trainer options and what to use instead."""
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values()]
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values()]
    try:
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    except InstantiationException as err:
        if not isinstance(err.__cause__, (MisconfigurationException, ValueError)):
            raise
        raise ValueError(device_mistake(cfg.trainer, err.__cause__)) from err
    trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    return trainer


DEVICE_OPTIONS = ("accelerator", "devices", "strategy", "precision")


def device_mistake(trainer: DictConfig, err: Exception) -> str:
    settings = " ".join(
        override(f"trainer.{key}", trainer[key]) for key in DEVICE_OPTIONS if trainer.get(key) is not None
    )
    reason = " ".join(str(err).split())
    if str(trainer.get("accelerator")) in ("gpu", "cuda") and not torch.cuda.is_available():
        fix = "this machine has no GPU: use trainer=cpu, or trainer=default (a GPU where there is one)"
    else:
        fix = "change them (conf/trainer/ has a preset for each kind of machine: trainer=cpu, gpu, ddp)"
    return f"{settings}: Lightning cannot run with these ({reason}); {fix}"

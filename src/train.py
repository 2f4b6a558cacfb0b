"""Train a prompt on few labelled images and test it.

python -m src.train dataset=oxford_pets ctx=class_specific shots=8
python -m src.train experiment=quickstart          # offline: zero-shot, then CoOp, on digits
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger

from src.cli import run
from src.data.subsample import subsample_suffix
from src.files import atomic_write, save_torch, write_json
from src.models.clip import FrozenCLIP, shipped_weights
from src.models.zeroshot import ZeroShotCLIP
from src.precheck import check_training_run
from src.quiet import silence_known_warnings
from src.results import evaluation_fields
from src.resume import AtomicCheckpointIO, check_run_dir, prepare_run_dir

log = logging.getLogger(__name__)


def default_precision() -> str:
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


OmegaConf.register_new_resolver("default_precision", default_precision, replace=True)
OmegaConf.register_new_resolver("subsample_suffix", subsample_suffix, replace=True)
OmegaConf.register_new_resolver("shipped_weights", shipped_weights, replace=True)
# Progress bars only where someone watches them: not in SLURM logs, CI or redirected output.
OmegaConf.register_new_resolver("isatty", lambda: sys.stdout.isatty(), replace=True)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fits the method on the k-shot train set, tests the last model, writes the run's files."""
    silence_known_warnings()
    out = Path(cfg.paths.output_dir)
    done = out / "results.json"
    if cfg.get("skip_done", False) and done.exists():
        # A re-launched sweep runs only what is missing (results.json is written last, atomically).
        check_run_dir(cfg, out)  # the results of this configuration
        log.info("%s exists: skipping this run (skip_done=false runs it again)", done)
        return json.loads(done.read_text())
    datamodule = check_training_run(cfg, out)  # every mistake at once, before the slow weights
    last = prepare_run_dir(cfg, out)  # the folder remembers this configuration
    pl.seed_everything(cfg.seed, workers=True)
    clip = instantiate(cfg.model)
    datamodule.image_size = clip.image_size
    module = instantiate(cfg.method.module, clip=clip, classnames=datamodule.classnames)
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        callbacks=[instantiate(c) for c in cfg.get("callbacks", {}).values()],
        logger=[instantiate(c) for c in cfg.get("logger", {}).values()],
    )
    trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    log.info("%s with %s on %s", cfg.method.name, describe_backbone(clip), describe_devices(trainer))
    if trainer.is_global_zero:
        text = OmegaConf.to_yaml(cfg, resolve=True)
        atomic_write(out / "config.yaml", lambda f: f.write(text.encode()))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved)

    baseline = None
    if cfg.get("baseline") == "zeroshot":
        baseline = zeroshot_baseline(cfg, clip, datamodule)
    if last is not None:
        log.info("resuming from %s", last)
    start = time.perf_counter()
    if cfg.method.fit:
        trainer.fit(module, datamodule=datamodule, ckpt_path=last)
    train_time = time.perf_counter() - start
    (metrics,) = trainer.test(module, datamodule=datamodule, verbose=False)

    results = {
        "dataset": cfg.dataset.name,
        "subsample": cfg.dataset.subsample,
        "method": cfg.method.name,
        "shots": cfg.shots,
        "seed": cfg.seed,
        "ctx": cfg.ctx.name,
        "n_ctx": module.prompt_learner.n_ctx if hasattr(module, "prompt_learner") else None,
        "ctx_init": cfg.ctx.init,
        "ctx_init_count": cfg.ctx.init_count if cfg.ctx.init else None,  # words: the reference's count
        "class_token_position": cfg.ctx.class_token_position,
        **evaluation_fields(clip, datamodule, trainer, metrics),
        "num_train": len(datamodule.train_items),
        "fewshot_sampler": datamodule.fewshot_origin["sampler"],
        "fewshot_source": datamodule.fewshot_origin["source"],  # None: drawn by this run
        "train_time_s": round(train_time, 3),
        "epochs": trainer.max_epochs,
        "train_views": cfg.data.train_views,
        "label_noise": datamodule.label_noise,
        "noisy_labels": len(datamodule.flipped),
    }
    if hasattr(module, "result_fields"):  # what a method adds to (or has instead of) CoOp's fields
        results.update(module.result_fields())
    if baseline is not None:
        results.update(zeroshot_acc=baseline, gain=results["test_acc"] - baseline)
        log.info(
            "zero-shot CLIP (%r) %.2f%%, %s %.2f%%: %+.2f points",
            cfg.dataset.template, baseline, cfg.method.name, results["test_acc"], results["gain"],
        )
    if trainer.is_global_zero:
        if hasattr(module, "prompt_state"):
            save_torch(out / "prompt.pt", module.prompt_state())
        write_json(out / "results.json", results)
        log.info(
            "test accuracy %.2f%% (%d images); results in %s", results["test_acc"], results["num_test"], out
        )
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            # The next run of a sweep in this process gets its own W&B run, not this one.
            logger.experiment.finish()
    return results


def describe_backbone(clip: FrozenCLIP) -> str:
    return f"{clip.name} ({clip.pretrained or 'random weights'})"


def describe_devices(trainer: pl.Trainer) -> str:
    """'cpu, precision 32-true', '4 cuda devices, precision bf16-mixed' (Lightning's own lines are
    in the run's log file)."""
    count = trainer.num_devices * trainer.num_nodes
    kind = trainer.strategy.root_device.type
    return f"{kind if count == 1 else f'{count} {kind} devices'}, precision {trainer.precision}"


def zeroshot_baseline(cfg: DictConfig, clip: FrozenCLIP, datamodule: pl.LightningDataModule) -> float:
    """Test accuracy (percent) of zero-shot CLIP with the dataset's hand-made template, on the test
    set the method is tested on: the baseline a learned prompt has to beat (`baseline=zeroshot`)."""
    module = ZeroShotCLIP(clip, datamodule.classnames, [cfg.dataset.template])
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    (metrics,) = trainer.test(module, datamodule=datamodule, verbose=False)
    log.info("zero-shot CLIP with %r: test accuracy %.2f%%", cfg.dataset.template, 100 * metrics["test/acc"])
    return 100 * metrics["test/acc"]


# Config groups whose options are numbers (conf/shots/8.yaml). Hydra parses `shots=8` as an integer
# and refuses integers as group choices, so the command line's numbers are quoted before parsing.
NUMERIC_GROUPS = ("shots",)


def quote_numeric_choices(args: list[str]) -> list[str]:
    """`shots=8` -> `shots='8'`, `shots=1,2,4` -> `shots='1','2','4'` (for sweeps)."""
    pattern = re.compile(rf"^((?:\+|~)?(?:{'|'.join(NUMERIC_GROUPS)}))=(\d+(?:,\d+)*)$")
    quoted = []
    for arg in args:
        match = pattern.match(arg)
        if match:
            arg = f"{match[1]}=" + ",".join(f"'{v}'" for v in match[2].split(","))
        quoted.append(arg)
    return quoted


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return train(cfg)["test_acc"]


if __name__ == "__main__":
    sys.argv = quote_numeric_choices(sys.argv)
    run(main)

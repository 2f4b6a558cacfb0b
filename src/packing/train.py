"""Runs trained together (`pack=true`): a sweep's runs that differ only in seed and context
settings, trained as one job on one frozen CLIP (docs/packing.md).

Every run writes its own folder as a run trained alone does (results.json, prompt.pt, fewshot.json,
config.yaml, csv/metrics.csv, train.log and checkpoints/last.ckpt in Lightning's format), so a
packed run resumes alone and a run killed alone resumes in a pack. Which runs pack together is the
sweep's business (src/packing/jobs.py); the pack's step is src/packing/module.py.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.methods.base import build_method
from src.methods.schedules import RunLength
from src.models.clip import FrozenCLIP
from src.packing.jobs import logging_to, member_configs
from src.packing.module import PackedRuns
from src.packing.refusal import check_pack
from src.packing.runs import PackedRun, RandomStream
from src.run.backbone import describe_backbone, describe_devices, image_encoder
from src.run.callbacks import NonFiniteLossError
from src.run.checks import CheckedRun, check_training_run
from src.run.cli import FailedRuns, user_error
from src.run.logs import silence_known_warnings
from src.run.resume import continue_logs, prepare_run_dir, read_checkpoint, stopped_by_sigterm
from src.run.training import (
    finished_run,
    finished_validation,
    run_results,
    validation_results,
    write_config,
    write_results,
    zeroshot_baseline,
)

log = logging.getLogger(__name__)


def train_packed_job(cfg: DictConfig) -> list[dict[str, Any]]:
    """A multirun's job that holds a pack (`+packed_runs`, src/packing/jobs.py): its runs' configs,
    trained together, each run's folder getting the job's log."""
    cfgs = member_configs(cfg)
    with logging_to([Path(run.paths.output_dir) for run in cfgs]):
        return train_packed(cfgs)


def train_packed(cfgs: list[DictConfig], test: bool = True) -> list[dict[str, Any]]:
    """Trains the runs of `cfgs` (one method and data, seeds and contexts of their own; see
    src/packing/jobs.py) as one pack and writes each run's folder; returns their results, in order.
    Runs with results (`skip_done`) are not trained again. A run that fails its checks is left out,
    the others train, and then FailedRuns names it (as the sweep names a run that fails alone).
    `test=False`: validated instead of tested, as `train(cfg, test=False)` (a search's trial)."""
    silence_known_warnings()
    results: dict[int, dict[str, Any]] = {}
    checked: dict[int, CheckedRun] = {}
    refused: list[tuple[str, BaseException]] = []
    for index, cfg in enumerate(cfgs):
        out = Path(cfg.paths.output_dir)
        try:
            done = finished_run(cfg, out) if test else finished_validation(cfg, out)
            if done is None:  # every run's checks first, then the folders are claimed, as alone
                checked[index] = check_training_run(cfg, out)
            else:
                results[index] = done
        except Exception as err:
            if user_error(err) is None:
                raise  # a bug: its traceback
            log.error("%s: %s; the pack's other runs go on", out, user_error(err))
            refused.append((str(out), err))
    pending = list(checked)
    if pending:
        check_pack([cfgs[i] for i in pending])
        runs = [PackedRun(cfgs[i], checked[i]) for i in pending]
        for run in runs:
            run.last = prepare_run_dir(run.cfg, run.out)
        clip = build_runs(runs)
        by_epoch: dict[int, list[int]] = defaultdict(list)
        for position, run in enumerate(runs):
            by_epoch[run.start_epoch].append(position)
        for first_epoch, positions in sorted(by_epoch.items()):
            trained = train_together(clip, [runs[p] for p in positions], first_epoch, test)
            for position, result in zip(positions, trained, strict=True):
                results[pending[position]] = result
        failed = [run.failed for run in runs if run.failed is not None]
        if failed:  # the others have their results: a relaunched sweep trains these only
            raise NonFiniteLossError(
                f"{len(failed)} of the pack's {len(cfgs)} runs stopped, the others finished: "
                + "; ".join(failed)
            )
    if refused:  # the others have their results: the corrected sweep trains these only
        raise FailedRuns(refused, len(cfgs))
    return [results[index] for index in range(len(cfgs))]


def build_runs(runs: list[PackedRun]) -> FrozenCLIP:
    """One CLIP for all runs; each run's method built, and its stream started, from the generator's
    state after building CLIP with its seed, as the run alone would (CLIP's construction draws
    from the stream even when it loads weights, so it is built once per seed; weights loaded from
    a file are the same for every seed, and runs of several seeds need them)."""
    seeds = list(dict.fromkeys(int(run.cfg.seed) for run in runs))
    if len(seeds) > 1 and runs[0].cfg.model.get("pretrained") is None:
        raise ValueError(
            f"model={runs[0].cfg.model.name} has random weights, which depend on the seed: runs of seeds "
            f"{seeds} cannot share it; pack runs of one seed (src/packing/jobs.py does)"
        )
    clip, states = None, {}
    for seed in seeds:
        pl.seed_everything(seed, workers=True)
        built = instantiate(runs[0].cfg.model)
        states[seed] = torch.get_rng_state()
        clip = clip or built
    for run in runs:
        run.datamodule.setup("fit")  # the run's few-shot subsets (fewshot.json)
        run.stream = RandomStream(states[int(run.cfg.seed)])
        run.module = run.stream.drawing(build_method, run.cfg.method, clip, run.datamodule.classnames)
        # a pack steps the schedules per epoch (`pack_refusal` leaves per-step ones to train alone)
        optimization = run.module.optimization(RunLength(epochs=run.max_epochs, steps=math.inf))
        run.optimizer = optimization["optimizer"]
        run.scheduler = optimization["lr_scheduler"]["scheduler"]
        if run.last is not None:
            log.info("%s: resuming from %s", run.out, run.last)
            run.restore(read_checkpoint(run.last))
        continue_logs(run.loggers, run.steps)  # the restored checkpoint's step, 0 for a new run
    return clip


def train_together(
    clip: FrozenCLIP, runs: list[PackedRun], first_epoch: int, test: bool = True
) -> list[dict[str, Any] | None]:
    """Fits runs that continue from the same epoch as one pack, tests (or, `test=False`, validates)
    them and writes their files; None for a run that stopped (`PackedRun.failed`)."""
    first = runs[0]
    epochs = first.max_epochs - first_epoch
    trainer: pl.Trainer = instantiate(
        first.cfg.trainer, max_epochs=epochs, logger=False, enable_checkpointing=False, callbacks=[]
    )
    log.info(
        "a pack of %d runs: %s with %s on %s",
        len(runs),
        first.cfg.method.name,
        describe_backbone(clip),
        describe_devices(trainer),
    )
    for run in runs:
        run.datamodule.use_encoder(image_encoder(clip, trainer))  # features on the pack's device
        write_config(run.cfg, run.out)
        resolved = OmegaConf.to_container(run.cfg, resolve=True)
        for logger in run.loggers:
            logger.log_hyperparams(resolved)
            logger.log_hyperparams(run.module.hparams_initial)
    baseline = (
        zeroshot_baseline(first.cfg, clip, first.datamodule)
        if first.cfg.get("baseline") == "zeroshot" and test
        else None
    )
    pack = PackedRuns(clip, runs, first_epoch)
    start = time.perf_counter()
    with stopped_by_sigterm(*(run.out for run in runs)):
        if epochs > 0:
            trainer.fit(pack)
        train_time = (time.perf_counter() - start) / len(runs)  # each run's share of the pack's time
        if test:
            trainer.test(pack, verbose=False)
            per_run = pack.test_metrics
        else:  # a search's trial: each run's validation.json, as train(cfg, test=False) alone
            per_run = [{"val/acc": acc} for acc in pack.validate_last()]
    results = []
    for run, metrics in zip(runs, per_run, strict=True):
        if run.failed is not None:  # no results: as alone, the run stopped
            results.append(None)
            continue
        if test:
            result = run_results(
                run.cfg, run.module, run.datamodule, trainer, metrics, train_time, run.max_epochs, baseline
            )
            result["pack_size"] = len(runs)
            write_results(run.out, run.module, result)
        else:
            args = (run.cfg, run.datamodule, metrics, train_time, run.out, run.max_epochs)
            result = validation_results(*args, pack_size=len(runs))
        for logger in run.loggers:
            logger.finalize("success")
        results.append(result)
    return results

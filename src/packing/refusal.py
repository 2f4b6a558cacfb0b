"""What keeps a run out of a pack: its method (derived from what the pack's step runs of it,
src/packing/module.py), or settings a pack does not reproduce (several devices, fp16 loss scaling,
loggers other than the CSV log, callbacks of their own, partial epochs); and what the runs of one
pack may differ in (`PACKABLE_KEYS`): the seed and the context's settings.

Those change a run's context and its random stream only: the runs of a pack share the data set,
the classes, the backbone, the recipe (epochs, schedule, batch size, precision) and the method's
training step, which is what lets one pass of each frozen encoder serve them all. Anything else
makes other work: `shots` and `dataset` other few-shot sets, test sets and epochs; `model` another
backbone; `method` another training step; `data.*`, `trainer.*` and `method.module.*` other
loaders, precision, schedules or losses.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from src.methods.base import method_class, recipe_factories
from src.methods.schedules import RunLength
from src.packing.module import step_refusal
from src.run.resume import differences

PACKABLE_KEYS = (
    "seed",
    "ctx",
    "ctx.class_specific",
    "ctx.class_token_position",
    "ctx.n_ctx",
    "ctx.init",
    "ctx.init_count",
)
# The callbacks a pack does for each of its runs (src/packing/module.py), by their config's _target_.
PACKED_CALLBACKS = (
    "src.run.resume.PeriodicCheckpoint",
    "src.run.resume.RandomState",
    "pytorch_lightning.callbacks.LearningRateMonitor",
    "src.run.callbacks.StopOnNonFiniteLoss",
)
PACKED_LOGGERS = ("src.run.resume.ContinuedCSVLogger", "pytorch_lightning.loggers.CSVLogger")


# Trainer settings a pack runs as Lightning does only at these values (or without them).
PACKED_TRAINER = {
    "max_steps": (None, -1),
    "limit_train_batches": (None, 1, 1.0),
    "limit_val_batches": (None, 1, 1.0),
    "val_check_interval": (None, 1, 1.0),
    "fast_dev_run": (None, False, 0),
    "accumulate_grad_batches": (None, 1),
    "gradient_clip_val": (None, 0, 0.0),
}


def pack_refusal(cfg: DictConfig) -> str | None:
    """Why the run of `cfg` is trained alone, None when it can be packed."""
    method = method_class(cfg.method)
    refusal = step_refusal(method)
    if refusal is not None:
        return f"method={cfg.method.name} ({method.__name__}) {refusal}"
    interval = schedule_interval(cfg.method)
    if interval not in (None, "epoch"):
        return f"method.scheduler steps per {interval}: a pack steps schedules per epoch; runs train alone"
    trainer = cfg.trainer
    other = [
        f"trainer.{key}={trainer[key]}"
        for key, kept in PACKED_TRAINER.items()
        if trainer.get(key) not in kept
    ]
    if trainer.get("check_val_every_n_epoch", 1) is None:
        other.append("trainer.check_val_every_n_epoch=null")
    if other:
        return f"{', '.join(other)}: a pack trains every epoch whole, as the paper's recipe; runs train alone"
    if trainer.get("devices", 1) != 1 or trainer.get("num_nodes", 1) != 1:
        return "several devices: each run trains on them alone (trainer.devices, trainer.num_nodes)"
    if str(trainer.get("precision")).startswith("16"):
        return "fp16 scales each run's loss on its own: runs train alone (trainer.precision)"
    loggers = [c.get("_target_") for c in cfg.get("logger", {}).values()]
    if any(target not in PACKED_LOGGERS for target in loggers):
        return "a logger other than the CSV log (logger=csv) logs each run on its own"
    callbacks = [c.get("_target_") for c in cfg.get("callbacks", {}).values()]
    unknown = [target for target in callbacks if target not in PACKED_CALLBACKS]
    if unknown:
        return f"callbacks of their own ({', '.join(unknown)}) run for runs trained alone"
    checkpoint = cfg.get("callbacks", {}).get("model_checkpoint") or {}
    if checkpoint.get("monitor") or checkpoint.get("every_n_train_steps"):
        return (
            "a checkpoint chosen by a metric or every N steps (callbacks.model_checkpoint): runs train alone"
        )
    return None


def check_pack(cfgs: list[DictConfig]) -> None:
    """Raises ValueError when the runs of `cfgs` cannot be trained as one pack."""
    for cfg in cfgs:
        refusal = pack_refusal(cfg)
        if refusal is not None:
            raise ValueError(f"{cfg.paths.output_dir} cannot be packed: {refusal}")
    folders = [cfg.paths.output_dir for cfg in cfgs]
    if len(set(folders)) < len(folders):
        raise ValueError(
            f"runs of a pack share a run folder ({folders}): name runs by every swept setting in "
            "hydra.sweep.subdir, or pack=false"
        )
    shared = _shared_settings(cfgs[0])
    for cfg in cfgs[1:]:
        changed = differences(shared, _shared_settings(cfg))
        if changed:
            raise ValueError(
                f"{cfg.paths.output_dir} and {cfgs[0].paths.output_dir} differ in more than "
                f"{', '.join(PACKABLE_KEYS)} ({changed}): they cannot be packed"
            )


def _shared_settings(cfg: DictConfig) -> dict[str, Any]:
    """What the runs of a pack share: every setting as composed (interpolations unresolved, so that
    `data.seed: ${seed}` is the same in every run) but the packable ones and the run's folder."""
    own = ("seed", "ctx", "paths")
    return {
        key: value
        for key, value in leaves(OmegaConf.to_container(cfg, resolve=False))
        if not any(key == k or key.startswith(k + ".") for k in own)
    }


def leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a plain config."""
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from leaves(value, f"{prefix}{key}.")
    elif isinstance(node, list) and node:
        for index, value in enumerate(node):
            yield from leaves(value, f"{prefix}{index}.")
    else:
        yield prefix[:-1], node


def schedule_interval(method_cfg: DictConfig) -> str | None:
    """Whether the schedule of a method's recipe (method.scheduler) steps per "epoch" or "step";
    None without one."""
    optimizer, scheduler = recipe_factories(method_cfg)
    if optimizer is None or scheduler is None:
        return None
    built = scheduler(optimizer([torch.zeros(1, requires_grad=True)]), RunLength(epochs=1, steps=1))
    return built.get("interval", "epoch")

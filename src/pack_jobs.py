"""Which runs of a sweep train together (`pack=true`), and how a pack travels as one job.

The grid sweeper (hydra_plugins/coop_grid_sweeper) groups the jobs of a multirun that differ only
in packable settings (`PACKABLE_KEYS`) into packs of at most `pack_size` runs; each pack is launched
as one job (one process, one SLURM job): the overrides of its first run plus `+packed_runs=[...]`,
each run's packable settings. The job composes every run's own config from them, exactly as the
launcher would have for that run alone, with its own output folder, and trains them together
(src/packing.py).

Packable: the seed and the context's settings (`ctx` unified / class-specific, its class token
position, length, initial words and how they count). They change a run's context and its random
stream only: the runs of a pack share the data set, the classes, the backbone, the recipe (epochs,
schedule, batch size, precision) and the method's training step, which is what lets one pass of
each frozen encoder serve them all. Anything else makes other work: `shots` and `dataset` other
few-shot sets, test sets and epochs; `model` another backbone; `method` another training step;
`data.*`, `trainer.*` and `method.module.*` other loaders, precision, schedules or losses.

Runs of different seeds share the backbone only when its weights are loaded (`model.pretrained`):
random weights (`model=tiny`) depend on the seed, so such runs pack within a seed. Runs whose
method cannot be packed (`Method.packable`: CoCoOp, TPT, the linear probe, Tip-Adapter, ...), or
whose settings a pack does not reproduce (several devices, fp16 loss scaling, loggers other than
the CSV log, callbacks of their own), are launched alone, as without `pack`; the log says so.
"""

from __future__ import annotations

import copy
import logging
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from src.files import atomic_write
from src.methods.base import method_class
from src.methods.coop import CoOp
from src.resume import differences

log = logging.getLogger(__name__)

PACKABLE_KEYS = (
    "seed",
    "ctx",
    "ctx.class_specific",
    "ctx.class_token_position",
    "ctx.n_ctx",
    "ctx.init",
    "ctx.init_count",
)
PACKED_RUNS = "packed_runs"  # the override that carries a pack's runs
# The callbacks a pack does for each of its runs (src/packing.py), by their config's _target_.
PACKED_CALLBACKS = (
    "src.resume.PeriodicCheckpoint",
    "src.resume.RandomState",
    "pytorch_lightning.callbacks.LearningRateMonitor",
    "src.callbacks.StopOnNonFiniteLoss",
)
PACKED_LOGGERS = ("pytorch_lightning.loggers.CSVLogger",)


# CoOp's hooks that a pack does not call: it trains each run with CoOp's step (the method's
# `text_inputs`, `logits`, `loss` and `optimization`), so a packable method keeps these as CoOp's.
STEP_HOOKS = (
    "training_step",
    "forward",
    "features",
    "image_features",
    "text_features",
    "regulariser",
    "configure_optimizers",
    "optimizer_step",
    "setup",
    "on_fit_start",
    "on_train_start",
    "on_train_epoch_start",
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_train_batch_end",
    "on_train_epoch_end",
    "lr_scheduler_step",
    "optimizer_zero_grad",
    "on_before_batch_transfer",
    "on_after_batch_transfer",
    "transfer_batch_to_device",
    "on_load_checkpoint",
    "validation_step",
    "on_validation_epoch_start",
    "on_validation_epoch_end",
    "test_step",
    "on_test_epoch_start",
    "on_test_epoch_end",
)
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
    if not getattr(method, "packable", False):
        return f"method={cfg.method.name} ({method.__name__}) trains each run on its own (packable is False)"
    if not issubclass(method, CoOp):
        return f"method={cfg.method.name} ({method.__name__}) says packable, but a pack trains CoOp's step"
    changed = [hook for hook in STEP_HOOKS if getattr(method, hook) is not getattr(CoOp, hook)]
    if changed:  # a subclass that inherited `packable` and changed the step (a pack would not run it)
        return (
            f"method={cfg.method.name} ({method.__name__}) overrides {', '.join(changed)}, which a pack "
            "does not run: its runs train alone"
        )
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
        for key, value in _leaves(OmegaConf.to_container(cfg, resolve=False))
        if not any(key == k or key.startswith(k + ".") for k in own)
    }


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a plain config."""
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    elif isinstance(node, list) and node:
        for index, value in enumerate(node):
            yield from _leaves(value, f"{prefix}{index}.")
    else:
        yield prefix[:-1], node


def group_jobs(
    jobs: list[list[str]], compose: Callable[[list[str]], DictConfig], pack_size: int
) -> list[list[str]]:
    """The sweep's `jobs` (lists of overrides), those that differ only in packable settings as one
    job per pack of at most `pack_size` runs; `compose` gives a job's config."""
    if pack_size < 1:
        raise ValueError(f"pack_size={pack_size}: a pack holds at least 1 run")
    groups: dict[tuple[str, ...], list[list[str]]] = defaultdict(list)
    for job in jobs:
        groups[tuple(o for o in job if _key(o) not in PACKABLE_KEYS)].append(job)
    out: list[list[str]] = []
    alone: dict[str, int] = defaultdict(int)  # runs launched alone, per reason
    packs = packed = 0
    for members in groups.values():
        if len(members) == 1:  # nothing to pack it with
            out.extend(members)
            continue
        cfg = compose(members[0])
        refusal = pack_refusal(cfg) or _subdir_refusal(cfg)
        if refusal is not None:
            alone[refusal] += len(members)
            out.extend(members)
            continue
        parts = [members]
        if cfg.model.get("pretrained") is None:
            by_seed: dict[str, list[list[str]]] = defaultdict(list)
            for job in members:
                by_seed[_values(job).get("seed", str(cfg.seed))].append(job)
            if len(by_seed) > 1:
                log.info(
                    "model=%s has random weights, which depend on the seed: runs are packed within a seed",
                    cfg.model.name,
                )
            parts = list(by_seed.values())
        for part in parts:
            for start in range(0, len(part), pack_size):
                launched = packed_jobs(part[start : start + pack_size])
                out.extend(launched)
                if len(launched) == 1 and len(part[start : start + pack_size]) > 1:
                    packs += 1
                    packed += len(part[start : start + pack_size])
    for reason, count in alone.items():
        log.info("%d runs trained alone: %s", count, reason)
    log.info(
        "pack=true: %d runs in %d packs (pack_size=%d); %d jobs in all", packed, packs, pack_size, len(out)
    )
    return out


def _subdir_refusal(cfg: DictConfig) -> str | None:
    """Why runs whose folders are named by Hydra's job (its number, its overrides) train alone: a
    pack is one job, so its runs would share that name."""
    sweep = OmegaConf.to_container(cfg.hydra.sweep, resolve=False) if "hydra" in cfg else {}
    subdir = str(sweep.get("subdir", ""))
    if re.search(r"hydra[.:]job\.", subdir):
        return f"hydra.sweep.subdir={subdir} names each run by Hydra's job, which a pack's runs share"
    return None


def packed_jobs(members: list[list[str]]) -> list[list[str]]:
    """One job for the runs of `members`: the first run's overrides plus each run's packable ones
    (`+packed_runs=[{seed:'2',ctx:'class_specific'},...]`). A single run, or runs whose values do not
    survive Hydra's quoting, are launched as they are."""
    if len(members) == 1:
        return members
    runs = [{_key(o): o.split("=", 1)[1] for o in job if _key(o) in PACKABLE_KEYS} for job in members]
    encoded = ",".join(
        "{" + ",".join(f"{key}:{_quote(value)}" for key, value in run.items()) + "}" for run in runs
    )
    job = [*members[0], f"+{PACKED_RUNS}=[{encoded}]"]
    if member_overrides(job) != members:
        log.warning("runs %s are launched alone: their settings cannot be passed as one job", members)
        return members
    return [job]


def member_overrides(job: list[str]) -> list[list[str]]:
    """The overrides of each run of a packed job (`packed_job`'s inverse)."""
    (carrier,) = [o for o in job if o.startswith(f"+{PACKED_RUNS}=")]
    runs = OverridesParser.create().parse_override(carrier).value()
    base = [o for o in job if o != carrier]
    members = []
    for run in runs:
        overrides = [f"{_key(o)}={run[_key(o)]}" if _key(o) in run else o for o in base]
        overrides += [f"{key}={value}" for key, value in run.items() if key not in {_key(o) for o in base}]
        members.append(overrides)
    return members


def _key(override: str) -> str:
    return override.split("=", 1)[0]


def _values(job: list[str]) -> dict[str, str]:
    return dict(override.split("=", 1) for override in job)


def _quote(text: str) -> str:
    """`text` as a quoted Hydra string: a quote escaped, and backslashes before a quote or at the end
    doubled (Hydra reads other backslashes as they are)."""
    text = re.sub(r"(\\+)$", lambda m: m[1] * 2, text)
    return "'" + re.sub(r"(\\*)'", lambda m: m[1] * 2 + "\\'", text) + "'"


def member_configs(cfg: DictConfig) -> list[DictConfig]:
    """Each run's config in a packed job (its task config `cfg` holds `packed_runs`), composed as the
    launcher composes a job's and resolved in its own output folder, where it would run alone."""
    job = HydraConfig.get()
    overrides = member_overrides(list(job.overrides.task))
    # the sweep's folder: this job's output folder is the first run's, <sweep dir>/<its subdir>
    subdir = Path(job.sweep.subdir)
    sweep_dir = Path(job.runtime.output_dir).parents[len(subdir.parts) - 1]
    if sweep_dir / subdir != Path(job.runtime.output_dir):
        raise ValueError(
            f"hydra.sweep.subdir={subdir}: a packed job's folder must end with it; give a relative "
            "subdir without '..', or pack=false"
        )
    master = OmegaConf.create(
        {
            "hydra": {
                "overrides": {"hydra": list(job.overrides.hydra)},
                "job": {"config_name": job.job.config_name},
            }
        }
    )
    loader = GlobalHydra.instance().config_loader()
    first = copy.deepcopy(cfg)  # this job's config is the first run's, plus `packed_runs`
    with open_dict(first):
        del first[PACKED_RUNS]
    write_hydra_files(first, job, overrides[0])  # Hydra wrote the pack's: the first run's instead
    _resolve_hydra_values(first)
    configs = [first]
    with _restored_hydra_config():
        for run in overrides[1:]:
            full = loader.load_sweep_config(master, run)
            out = sweep_dir / str(full.hydra.sweep.subdir)
            with open_dict(full):
                full.hydra.runtime.output_dir = str(out.absolute())
            HydraConfig.instance().set_config(full)
            task = OmegaConf.masked_copy(full, [key for key in full if key != "hydra"])
            write_hydra_files(task, full.hydra, run)
            _resolve_hydra_values(task)
            configs.append(task)
    return configs


def write_hydra_files(task: DictConfig, hydra: DictConfig, overrides: list[str]) -> None:
    """A packed run's `.hydra/` (config.yaml, hydra.yaml, overrides.yaml), as Hydra writes them
    into the folder of a job of its own."""
    if hydra.get("output_subdir") is None:
        return
    hydra = copy.deepcopy(hydra)
    OmegaConf.set_readonly(hydra, False)  # Hydra's own config is read-only
    with open_dict(hydra):
        hydra.overrides.task = list(overrides)
    folder = Path(hydra.runtime.output_dir) / hydra.output_subdir
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "config.yaml": task,
        "hydra.yaml": OmegaConf.create({"hydra": hydra}),
        "overrides.yaml": hydra.overrides.task,
    }
    for name, content in files.items():
        text = OmegaConf.to_yaml(content).encode()
        atomic_write(folder / name, lambda f, text=text: f.write(text))


def _resolve_hydra_values(cfg: DictConfig) -> None:
    """Sets the values that read the Hydra config (`${hydra:runtime.output_dir}`, the run's folder)
    to this run's; the rest stays as composed, interpolations included, as in a job's config."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    for key in [k for k, v in _leaves(plain) if isinstance(v, str) and "${hydra:" in v]:
        OmegaConf.update(cfg, key, OmegaConf.select(cfg, key), force_add=True)


@contextmanager
def _restored_hydra_config() -> Iterator[None]:
    saved = HydraConfig.instance().cfg
    try:
        yield
    finally:
        HydraConfig.instance().cfg = saved


@contextmanager
def logging_to(folders: list[Path], name: str = "train.log") -> Iterator[None]:
    """Every run's folder gets the job's log (`name`, as Hydra writes it into the first one)."""
    root = logging.getLogger()
    existing = {Path(h.baseFilename).resolve() for h in root.handlers if isinstance(h, logging.FileHandler)}
    template = next((h for h in root.handlers if isinstance(h, logging.FileHandler)), None)
    added = []
    for folder in folders:
        path = (folder / name).resolve()
        if path in existing:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
        if template is not None:
            handler.setFormatter(template.formatter)
            handler.setLevel(template.level)
        root.addHandler(handler)
        added.append(handler)
    try:
        yield
    finally:
        for handler in added:
            root.removeHandler(handler)
            handler.close()

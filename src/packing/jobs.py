"""Which runs of a sweep train together (`pack=true`), and how a pack travels as one job.

The grid sweeper (hydra_plugins/coop_grid_sweeper) groups the jobs of a multirun that differ only
in packable settings (`PACKABLE_KEYS`) into packs of at most `pack_size` runs; each pack is launched
as one job (one process, one SLURM job): the overrides of its first run plus `+packed_runs=[...]`,
each run's packable settings. The job composes every run's own config from them, exactly as the
launcher would have for that run alone, with its own output folder, and trains them together
(src/packing/train.py).

Packable: the seed and the context's settings (src/packing/refusal.py, `PACKABLE_KEYS`).

Runs of different seeds share the backbone only when its weights are loaded (`model.pretrained`):
random weights (`model=tiny`) depend on the seed, so such runs pack within a seed. Runs that a pack
cannot train as alone (src/packing/refusal.py: CoCoOp, TPT, the linear probe, Tip-Adapter, several
devices, ...) are launched alone, as without `pack`; the log says so.

Hydra internals, used where Hydra has no public API for them: a packed job composes its other runs'
configs as Hydra's launcher composes a job's (`GlobalHydra.instance().config_loader()` and
`load_sweep_config`, with `HydraConfig.instance().set_config` around it, restored after), because
only the loader applies the sweep's hydra overrides and `hydra.sweep.subdir` exactly as for the run
alone; and it writes each run's `.hydra/` (config.yaml, hydra.yaml, overrides.yaml) as Hydra's
`run_job` does for a job of its own (`write_hydra_files`), which Hydra does not expose either.
"""

from __future__ import annotations

import copy
import logging
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from src.common.files import atomic_write
from src.packing.refusal import PACKABLE_KEYS, leaves, pack_refusal

log = logging.getLogger(__name__)

PACKED_RUNS = "packed_runs"  # the override that carries a pack's runs


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
    for key in [k for k, v in leaves(plain) if isinstance(v, str) and "${hydra:" in v]:
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

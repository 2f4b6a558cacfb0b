"""What the configs of conf/ need from code: the resolvers they use, the command line's numeric group
choices quoted, and configs composed as the command line composes them (src.protocols, tests).

Every entry point imports this module, which registers the resolvers once.
"""

from __future__ import annotations

import functools
import math
import re
import sys
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from src.common.dassl_checkpoint import dassl_file, is_dassl_checkpoint
from src.common.prompt_file import backbone_unknown, is_released, prompt_file, read_saved, run_folder
from src.data.subsample import subsample_suffix
from src.models.clip import shipped_weights

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")

# Config groups whose options are numbers (conf/shots/8.yaml). Hydra parses `shots=8` as an integer
# and refuses integers as group choices, so the command line's numbers are quoted before parsing.
NUMERIC_GROUPS = ("shots",)
# Config groups inside another group's folder (conf/method/base/: DePT's base method), which Hydra
# chooses with a slash (method/base=maple); the dotted spelling (method.base=maple) is taken too.
NESTED_GROUPS = ("method/base",)


def as_hydra_overrides(args: list[str]) -> list[str]:
    """The command line's overrides as Hydra takes them: `shots=8` -> `shots='8'`, `shots=1,2,4` ->
    `shots='1','2','4'` (for sweeps); `method.base=maple` -> `method/base=maple`."""
    numeric = re.compile(rf"^((?:\+|~)?(?:{'|'.join(NUMERIC_GROUPS)}))=(\d+(?:,\d+)*)$")
    dotted = {group.replace("/", "."): group for group in NESTED_GROUPS}
    quoted = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key in dotted:
            arg = f"{dotted[key]}={value}"
        match = numeric.match(arg)
        if match:
            arg = f"{match[1]}=" + ",".join(f"'{v}'" for v in match[2].split(","))
        quoted.append(arg)
    return quoted


def compose_config(name: str, overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """conf/<name>.yaml with `overrides`, as the command line composes it, writing to `output_dir`."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(name, overrides=as_hydra_overrides(overrides))
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


def default_precision() -> str:
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def prompt_paths(ckpt: str | ListConfig | list) -> list[str]:
    """`ckpt=<prompt>` or, for an ensemble, `ckpt=[<prompt>,<prompt>,...]`."""
    paths = [str(p) for p in ckpt] if isinstance(ckpt, (ListConfig, list)) else [str(ckpt)]
    if not paths:
        raise ValueError("ckpt=[]: give a prompt.pt, or a list of them for an ensemble")
    return paths


def read_prompt(path: str) -> dict[str, Any]:
    """A prompt file as the resolvers read it: once per file and version, however many of them ask
    (model=from_ckpt's name and weights, the seed, the run folder); a Dassl checkpoint of the
    original code as `read_saved` reads it."""
    file = dassl_file(path) if is_dassl_checkpoint(path) else prompt_file(path)
    stat = file.stat()
    return _read_prompt(str(file.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _read_prompt(file: str, mtime_ns: int, size: int) -> dict[str, Any]:
    return read_saved(file)


def prompt_field(path: str | ListConfig, field: str) -> Any:
    """A field of a prompt file (of the first, for an ensemble), for the config (model=from_ckpt
    reads the backbone from it). A Dassl checkpoint names no backbone: `model=` must."""
    first = prompt_paths(path)[0]
    state = read_prompt(first)
    if is_released(state) and field not in state:
        raise backbone_unknown(first)
    return state[field]


def prompt_seed(ckpt: str | ListConfig) -> int:
    """The default `seed=` of a command on a prompt: the seed its random-weight backbone was built
    with (the first prompt's, for an ensemble); 1 for loaded weights or a file older than the record."""
    seed = read_prompt(prompt_paths(ckpt)[0]).get("backbone_seed")
    return 1 if seed is None else int(seed)


def run_dir(ckpt: str | ListConfig) -> str:
    """Where outputs "beside the prompt" go: the run folder, whether ckpt= names it, its prompt.pt or
    its last.ckpt (the first prompt's, for an ensemble). Every prompt is read first, so that a
    mistyped or unreadable ckpt= stops the command before Hydra makes a folder from it."""
    paths = prompt_paths(ckpt)
    for path in paths:
        read_prompt(path)
    return str(run_folder(paths[0]))


def ensemble_suffix(ckpt: str | ListConfig, mode: str) -> str:
    """The evaluation folder's suffix: none for one prompt file, `_ensemble<n>_<mode>` for a list."""
    return f"_ensemble{len(ckpt)}_{mode}" if isinstance(ckpt, (ListConfig, list)) else ""


# Where a method's recipe (conf/method/<name>.yaml) sets the run's settings: each key below reads
# `method.<group>.<key>` in conf/<group>/ (tests/test_recipes.py holds the two together), and a
# value given for the key itself (data.batch_size=8) is taken over the method's.
RECIPE_PLACES = {
    "data": (
        "batch_size",
        "drop_last",
        "test_batch_size",
        "crop_scale",
        "hflip",
        "test_transform",
        "cache_features",
        "imagenet_names",
    ),
    "trainer": (
        "max_epochs",
        "epochs_by_shots",
        "epochs_by_subsample",
        "max_steps",
        "check_val_every_n_epoch",
    ),
    "ctx": ("n_ctx", "init"),
}


def check_recipe_places(method_cfg: DictConfig) -> None:
    """A ValueError naming a key of the method's recipe that no setting reads (a typo, or a setting
    that is not a recipe's): it would be silently ignored."""
    for group, places in RECIPE_PLACES.items():
        for key in method_cfg.get(group) or {}:
            if key not in places:
                raise ValueError(
                    f"method.{group}.{key}: a method's recipe sets {group}.{', '.join(places)} "
                    f"(docs/writing_a_method.md, The recipe); set {group}.{key} itself in an experiment "
                    "config or on the command line"
                )


def by_shots(epochs: DictConfig | None, shots: int, default: int) -> int:
    """A recipe's epochs for the shots of the run (method.trainer.epochs_by_shots: {1: 50, ...});
    `default` without one. OmegaConf cannot look up a key from an integer interpolation."""
    if epochs is None:
        return default
    table = {int(k): v for k, v in epochs.items()}
    if int(shots) not in table:
        raise ValueError(
            f"method.trainer.epochs_by_shots has no epochs for shots={shots} (it has {sorted(table)}): "
            "add them, or set trainer.max_epochs"
        )
    return table[int(shots)]


OmegaConf.register_new_resolver("default_precision", default_precision, replace=True)
OmegaConf.register_new_resolver("subsample_suffix", subsample_suffix, replace=True)
OmegaConf.register_new_resolver("shipped_weights", shipped_weights, replace=True)
# Progress bars only where someone watches them: not in SLURM logs, CI or redirected output.
OmegaConf.register_new_resolver("isatty", lambda: sys.stdout.isatty(), replace=True)
OmegaConf.register_new_resolver("prompt_field", prompt_field, replace=True)
OmegaConf.register_new_resolver("run_dir", run_dir, replace=True)
OmegaConf.register_new_resolver("prompt_seed", prompt_seed, replace=True)
OmegaConf.register_new_resolver("ensemble_suffix", ensemble_suffix, replace=True)
# A recipe's count from another setting (method=clip_lora: trainer.max_steps=${mul:500,${shots}}).
OmegaConf.register_new_resolver("mul", lambda *factors: math.prod(factors), replace=True)
OmegaConf.register_new_resolver("by_shots", by_shots, replace=True)

"""prompt.pt: a trained method as a small portable file, read back without unpickling code.

A run writes `Method.prompt_state()` to prompt.pt (and the same into checkpoints/last.ckpt while it
trains). The file names the method's class (`class`: `package.module.Class`); this module reads the
file as plain tensors and data, and the contract (src/methods/base.py, `method_from_prompt`)
imports that class, uses it only if it is a method, and rebuilds it (`from_prompt`). A method of
the user's own package is found when that package is importable (on PYTHONPATH). Files written
before the class was recorded name their method only: the project's own methods of that time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from src.common.dassl_checkpoint import DASSL_FORMAT, dassl_output_folder, is_dassl_checkpoint, read_dassl

PROMPT_FORMAT = 1  # prompt.pt's format; keys were added since, none changed meaning
CHECKPOINT_PROMPT = "prompt"  # the key of the prompt file's contents in a Lightning checkpoint
PROMPT_FILE = "prompt.pt"  # a finished run's prompt
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"  # Lightning's, holding the prompt as well
FIX = f"give a training run's folder, its {PROMPT_FILE} or its {LAST_CHECKPOINT}"

# Prompt files from before `class` was written: the methods that wrote them, and where their extra
# tensors were kept. KgCoOp's and ProGrad's files did not keep their arguments: their contexts are
# rebuilt as CoOp's (the regulariser only acts in training).
LEGACY_CLASSES = {
    "coop": "src.methods.coop.CoOp",
    "cocoop": "src.methods.cocoop.CoCoOp",
    "kgcoop": "src.methods.coop.CoOp",
    "prograd": "src.methods.coop.CoOp",
    "maple": "src.methods.maple.MaPLe",
    "tip_adapter": "src.methods.tip_adapter.TipAdapter",
    "tip_adapter_f": "src.methods.tip_adapter.TipAdapter",
}
LEGACY_WEIGHTS = {"meta_net": "meta_net.", "couplings": "couplings.", "deep_text": "deep_text"}


def prompt_file(path: str | Path) -> Path:
    """The file a prompt is read from: `path` itself, or in a run folder its prompt.pt (written at
    the end) or else its checkpoints/last.ckpt (the latest epoch of an unfinished run)."""
    path = Path(path)
    if path.is_dir():
        for file in (path / PROMPT_FILE, path / LAST_CHECKPOINT):
            if file.is_file():
                return file
        raise ValueError(f"ckpt={path}: this folder has no {PROMPT_FILE} or {LAST_CHECKPOINT}; {FIX}")
    if not path.is_file():
        raise ValueError(f"ckpt={path}: no such file or folder; {FIX}")
    return path


def run_folder(path: str | Path) -> Path:
    """The run folder of a prompt given as its folder, prompt.pt or checkpoints/last.ckpt: what is
    written "beside the prompt" goes there. A Dassl checkpoint's is its output folder."""
    path = Path(path)
    if is_dassl_checkpoint(path):
        return dassl_output_folder(path)
    if path.is_dir():
        return path
    if path.parent.name == LAST_CHECKPOINT.parent.name and path.suffix == LAST_CHECKPOINT.suffix:
        return path.parent.parent
    return path.parent


def load_prompt(path: str | Path) -> dict[str, Any]:
    """The prompt of a run (its folder, prompt.pt or checkpoints/last.ckpt), read without unpickling
    code, in today's layout (older files are brought up to it)."""
    file = prompt_file(path)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as err:  # torch raises many kinds for a file that is not plain tensors and data
        raise ValueError(
            f"{file} is not a prompt file of this project ({type(err).__name__}): {FIX}"
        ) from err
    if isinstance(state, dict) and "state_dict" in state:  # a Lightning checkpoint
        if CHECKPOINT_PROMPT not in state:
            raise ValueError(
                f"{file} is a checkpoint without a prompt (of a method without one, or of an older "
                f"version of this project): {FIX}"
            )
        state = state[CHECKPOINT_PROMPT]
    if not isinstance(state, dict) or state.get("format") != PROMPT_FORMAT:
        raise ValueError(f"{file} is not a prompt file of this project (format {PROMPT_FORMAT}): {FIX}")
    return {**upgrade(state, file), "trained_on": trained_on(file)}


def trained_on(file: Path) -> dict[str, str] | None:
    """The dataset and subsample (all, base, new) of the run that wrote a prompt file, from its run
    folder's fingerprint.json; None for a file away from its run folder."""
    try:
        config = json.loads((run_folder(file) / "fingerprint.json").read_text())["config"]
        return {"dataset": config["dataset.name"], "subsample": config.get("dataset.subsample", "all")}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def upgrade(state: dict[str, Any], file: str | Path = "the prompt file") -> dict[str, Any]:
    """A prompt file's state with `method`, `class` and `weights`, whatever its age."""
    if "class" in state:
        return state
    method = state.get("method", "coop")
    if method not in LEGACY_CLASSES:
        raise ValueError(f"{file} names no method class and its method {method!r} is unknown: {FIX}")
    weights = dict(state.get("weights", {}))
    for key, prefix in LEGACY_WEIGHTS.items():
        value = state.get(key)
        if isinstance(value, dict):
            weights.update({prefix + name: tensor for name, tensor in value.items()})
        elif value is not None:
            weights[prefix] = value
    hparams = dict(state.get("hparams", {}))
    if "prompt_depth" in state:
        hparams["prompt_depth"] = state["prompt_depth"]
    legacy = {"method": method, "class": LEGACY_CLASSES[method], "weights": weights, "hparams": hparams}
    return {**state, **legacy}


def read_saved(path: str | Path) -> dict[str, Any]:
    """What `ckpt=` names: a prompt of this project (`load_prompt`), or a prompt the original code
    published, a Dassl checkpoint (`is_released`; src/common/dassl_checkpoint.py), read without
    running code."""
    return read_dassl(path) if is_dassl_checkpoint(path) else load_prompt(path)


def is_released(state: dict[str, Any]) -> bool:
    """Whether `read_saved` read a Dassl checkpoint of the original code (rebuilt as a method by
    src/methods/released.py once the backbone is built)."""
    return state.get("format") == DASSL_FORMAT


def backbone_unknown(ckpt: Any) -> ValueError:
    """The error of a command that would take the backbone from a Dassl checkpoint, which does not
    name it."""
    return ValueError(
        f"ckpt={ckpt}: a checkpoint of the original code (Dassl) does not name the backbone it was "
        "learned on: give it with model=... (rn50, rn101, vit_b32, vit_b16, or model.name=... "
        "model.pretrained=...)"
    )

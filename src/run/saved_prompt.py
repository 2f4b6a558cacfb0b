"""A saved prompt as the commands take it (`ckpt=`): a prompt file of this project (a run's folder,
prompt.pt or last.ckpt: src/common/prompt_file.py) or a prompt the original code published, a
Dassl checkpoint (src/common/dassl_checkpoint.py), which is rebuilt as this project's method
(src/methods/released.py) once the backbone (`model=`) is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from src.common.dassl_checkpoint import DASSL_FORMAT, is_dassl_checkpoint, read_dassl
from src.common.prompt_file import load_prompt
from src.methods.released import prompt_from_dassl
from src.models.clip import FrozenCLIP


def read_saved(path: str | Path) -> dict[str, Any]:
    """The prompt file's state, or the Dassl checkpoint (`is_released`), read without running code."""
    return read_dassl(path) if is_dassl_checkpoint(path) else load_prompt(path)


def is_released(state: dict[str, Any]) -> bool:
    """Whether `read_saved` read a Dassl checkpoint of the original code."""
    return state.get("format") == DASSL_FORMAT


def as_prompt(
    state: dict[str, Any], clip: FrozenCLIP, classnames: list[str] | None, cfg: DictConfig
) -> dict[str, Any]:
    """A prompt file's state as it is; a Dassl checkpoint as one, for `clip` (the command's
    `model=`), `classnames` (the tested dataset's; None: those it was trained on), its method from
    `method=` (or its tensors) and the dataset's template (KgCoOp's and ProGrad's)."""
    if not is_released(state):
        return state
    method = cfg.method.name if cfg.get("method") else None
    template = cfg.dataset.get("template") if cfg.get("dataset") else None
    return prompt_from_dassl(state, clip, classnames, method, template)


def backbone_unknown(state: dict[str, Any], ckpt: Any) -> ValueError:
    """The error of a command that would take the backbone from a Dassl checkpoint, which does
    not name it."""
    return ValueError(
        f"ckpt={ckpt}: a checkpoint of the original code (Dassl) does not name the backbone it was "
        "learned on: give it with model=... (rn50, rn101, vit_b32, vit_b16, or model.name=... "
        "model.pretrained=...)"
    )

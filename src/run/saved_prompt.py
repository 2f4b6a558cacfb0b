"""A saved prompt as the commands take it (`ckpt=`, read by src/common/prompt_file.py's `read_saved`):
a prompt file of this project as it is, or a prompt the original code published, a Dassl checkpoint
(src/common/dassl_checkpoint.py), rebuilt as this project's method (src/methods/released.py) once
the backbone (`model=`) is built.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from src.common.prompt_file import is_released
from src.methods.released import prompt_from_dassl
from src.models.clip import FrozenCLIP


def as_prompt(
    state: dict[str, Any], clip: FrozenCLIP, classnames: list[str] | None, cfg: DictConfig
) -> dict[str, Any]:
    """A prompt file's state as it is; a Dassl checkpoint as one, for `clip` (the command's
    `model=`), `classnames` (the tested dataset's; None: those it was trained on), its method from
    `method=` (or its tensors) and the template its method takes for the dataset (KgCoOp's and
    ProGrad's)."""
    if not is_released(state):
        return state
    method = cfg.method.name if cfg.get("method") else None
    template = cfg.dataset.get("template") if cfg.get("dataset") else None
    if method and "template" in (cfg.method.get("module") or {}):
        template = cfg.method.module.template  # the method's own for the dataset (ProGrad's)
    return prompt_from_dassl(state, clip, classnames, method, template)

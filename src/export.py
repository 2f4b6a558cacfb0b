"""A prompt of this project as the original code's checkpoint, which its `train.py --eval-only` loads.

python -m src.export ckpt=outputs/oxford_pets/coop/.../seed1/prompt.pt format=dassl [epoch=50] [out=...]

`ckpt=` is a training run's folder, its prompt.pt or its checkpoints/last.ckpt. The method's
tensors go under the original names (src/methods/released.py) into a Dassl checkpoint,
`<out>/<model>/model.pth.tar-<epoch>` (src/common/dassl_checkpoint.py; `out` defaults to `dassl/`
in the run folder), for CoOp, CoCoOp, KgCoOp, ProGrad, MaPLe, IVLP and PromptSRC. The original code
loads it as its own: `python train.py --trainer CoOp ... --model-dir <out> --load-epoch <epoch>
--eval-only`, with the backbone and the context settings (N_CTX, CSC, CTX_INIT, prompt depths) of
the run that learned it, which the checkpoint does not record.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

import src.run.config  # noqa: F401  (the resolvers of conf/)
from src.common.dassl_checkpoint import write_dassl
from src.common.files import check_output
from src.common.messages import one_of
from src.common.prompt_file import load_prompt
from src.methods.base import method_from_prompt
from src.methods.released import METHOD_KEY, dassl_state
from src.run.cli import run, task
from src.run.results import training_results

log = logging.getLogger(__name__)

FORMATS = ("dassl",)


def export(cfg: DictConfig) -> Path:
    """Writes the prompt `cfg.ckpt` as a checkpoint of the original code into `cfg.out`; its path."""
    if cfg.format not in FORMATS:
        raise ValueError(one_of("format", cfg.format, FORMATS, "the original repositories' checkpoints"))
    if cfg.epoch is not None and (not isinstance(cfg.epoch, int) or cfg.epoch < 1):
        raise ValueError(f"epoch={cfg.epoch}: give the epoch as a positive whole number (e.g. epoch=50)")
    state = load_prompt(cfg.ckpt)
    check_output(Path(cfg.out) / "checkpoint", "out")
    pl.seed_everything(cfg.seed, verbose=False)  # a random-weight backbone is a function of the seed
    clip = instantiate(cfg.model)
    module = method_from_prompt(state, clip, state["classnames"], cfg.ckpt)
    model, state_dict = dassl_state(module)
    epoch = cfg.epoch or training_results(cfg.ckpt).get("epochs") or 1
    file = write_dassl(cfg.out, model, state_dict, epoch, **{METHOD_KEY: module.name})
    log.info(
        "%s's prompt written to %s: give the original code --model-dir %s --load-epoch %d --eval-only",
        module.name,
        file,
        cfg.out,
        epoch,
    )
    return file


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
@task
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    run(main)

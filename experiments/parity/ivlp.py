"""IVLP's parity fixture: the official code (muzairkhattak/PromptSRC, trainers/independentVL.py) run
on the project's tiny CLIP.

    PYTHONPATH=. python experiments/parity/ivlp.py /tmp/PromptSRC --dassl /tmp/Dassl.pytorch

The official trainer (class IVLP) is built by its own `build_model()` from the PromptSRC
repository's config (configs/trainers/IVLP/vit_b16_c2_ep20_batch4_4+4ctx.yaml: 4 text tokens from
"a photo of a", 4 image tokens, SGD lr 0.0025, batch 4, 20 epochs), the project's IVLP recipe,
with the prompts in both blocks of each tower of coop-tiny (depth 2; the recipe's 9 needs 9
blocks), and runs its own `forward_backward` on the fixed batch. In fp32: the official code's
fp16 casts of the prompts are undone (common.py). Stored: the initial prompts, the logits (eval
mode), the loss (`ce`), the gradients at the optimiser's step, the optimiser's settings and the lr
of each epoch.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from experiments.parity.common import (
    DATASET_NAME,
    dassl_step,
    dassl_trainer,
    normalise,
    official_clip,
    parse_args,
    prepare_dassl,
    save,
)

REPO = "muzairkhattak/PromptSRC"
COMMIT = "bb95c77b634d63488f2cad81ff4a72d53bdd06d5"
CONFIG = "configs/trainers/IVLP/vit_b16_c2_ep20_batch4_4+4ctx.yaml"
DEPTH = 2  # both blocks of coop-tiny, in each tower


def project_names(official: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """The official prompts under the project's names: the deep text prompts of blocks 1 .. J-1
    stacked as `deep_text`, the image prompts of the input and of blocks 1 .. J-1 as
    `visual_prompts`."""
    blocks = range(1, depth)
    named = {
        "prompt_learner.ctx": official["prompt_learner.ctx"],
        "deep_text": torch.stack(
            [official[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] for i in blocks]
        ),
        "visual_prompts": torch.stack(
            [official["image_encoder.VPT"]]
            + [official[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] for i in blocks]
        ),
    }
    return {name: tensor.detach().clone() for name, tensor in named.items()}


def official_cfg(checkout: Any, trainer: str, config: str, opts: list[Any]) -> Any:
    """The official config: Dassl's defaults, the repository's `extend_cfg`, the trainer's yaml,
    the base-to-new options of its scripts, the tiny CLIP's image size and depth, fp32, `opts`."""
    from dassl.config import get_cfg_default  # noqa: PLC0415  (the official code, on sys.path)

    cfg = get_cfg_default()
    importlib.import_module("train").extend_cfg(cfg)  # also registers the trainers
    cfg.merge_from_file(str(checkout / config))
    cfg.merge_from_list(
        ["DATASET.NUM_SHOTS", 16, "DATASET.SUBSAMPLE_CLASSES", "base", "DATASET.NAME", DATASET_NAME]
        + ["INPUT.SIZE", (32, 32), f"TRAINER.{trainer}.PREC", "fp32"]
        + [f"TRAINER.{trainer}.PROMPT_DEPTH_TEXT", DEPTH, f"TRAINER.{trainer}.PROMPT_DEPTH_VISION", DEPTH]
        + opts
    )
    cfg.freeze()
    return cfg


def main() -> None:
    args = parse_args(__doc__, REPO, COMMIT)
    prepare_dassl(args.checkout, args.dassl)
    cfg = official_cfg(args.checkout, "IVLP", CONFIG, [])
    ivlp = importlib.import_module("trainers.independentVL")

    plain = {"trainer": "IVLP", "vision_depth": 0, "language_depth": 0, "vision_ctx": 0, "language_ctx": 0}
    clip, fixture = official_clip(REPO, COMMIT, design=plain)
    torch.manual_seed(1)
    trainer = dassl_trainer(ivlp.IVLP, cfg, fixture["classnames"])
    model = trainer.model
    learned = {name: p for name, p in model.named_parameters() if p.requires_grad}
    images, labels = normalise(fixture["pixels"]), fixture["labels"]

    fixture["init"] = project_names(learned, DEPTH)
    fixture["same_init"] = ["prompt_learner.ctx"]  # "a photo of a": no random draw
    model.eval()
    with torch.no_grad():
        fixture["logits"] = model(images)
        model.train()
        fixture["loss"] = {"ce": model(images, labels)}  # forward_backward's loss
    trainer.set_model_mode("train")
    summary, grads = dassl_step(trainer, cfg, learned, images, labels, fixture)
    assert abs(summary["loss"] - fixture["loss"]["ce"].item()) < 1e-6
    fixture["grads"] = project_names(grads, DEPTH)
    save("ivlp", fixture, args.out)


if __name__ == "__main__":
    main()

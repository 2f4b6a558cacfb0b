"""MaPLe's parity fixture: the official code (muzairkhattak/multimodal-prompt-learning) run on the
project's tiny CLIP with ViT-B/16's widths.

    PYTHONPATH=. python experiments/parity/maple.py /tmp/multimodal-prompt-learning --dassl /tmp/Dassl.pytorch

The official trainer `trainers/maple.py` (class MaPLe) is built by its own `build_model()` from
its base-to-new config (configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml: 2 context tokens
from "a photo of a", SGD lr 0.0035, batch 4, 5 epochs) with the prompts in all 3 blocks of the
tiny model (PROMPT_DEPTH 3; the recipe's 9 needs 9 blocks), and runs its own `forward_backward`
on the fixed batch. Its prompt learner hard-codes ViT-B/16's widths (Linear(512, 768), deep text
prompts of 512), hence `coop-tiny-b16`. In fp32: the official code's fp16 casts are undone
(common.py). Stored: the initial prompts and couplings (their weights, 393,216 numbers each, start
from seeded values instead), the logits (eval mode), the loss (`ce`), the gradients at the
optimiser's step (the couplings' weights' as sketches), the optimiser's settings and the lr of
each epoch.
"""

from __future__ import annotations

import importlib

import torch

from experiments.parity.common import (
    DATASET_NAME,
    WIDE,
    dassl_step,
    dassl_trainer,
    normalise,
    official_clip,
    parse_args,
    prepare_dassl,
    save,
    seed_large,
    store_grads,
)

REPO = "muzairkhattak/multimodal-prompt-learning"
COMMIT = "69bce21ae8eda80ad6187534b2dce09cf6c59e17"
CONFIG = "configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml"
DEPTH = 3  # all the blocks of coop-tiny-b16


def coupling_names(depth: int) -> dict[str, str]:
    """The official couplings' names (`proj`, then the deep ones) -> the project's."""
    learner = "prompt_learner."
    names = {f"{learner}proj.{kind}": f"couplings.0.{kind}" for kind in ("weight", "bias")}
    for i in range(depth - 1):
        for kind in ("weight", "bias"):
            names[f"{learner}compound_prompt_projections.{i}.{kind}"] = f"couplings.{i + 1}.{kind}"
    return names


def project_names(official: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """The official prompt learner's tensors under the project's names: the deep text prompts
    stacked as `deep_text`, the couplings as `couplings.<block>`."""
    learner = "prompt_learner."
    named = {
        "prompt_learner.ctx": official[learner + "ctx"],
        "deep_text": torch.stack([official[f"{learner}compound_prompts_text.{i}"] for i in range(depth - 1)]),
    }
    named |= {project: official[name] for name, project in coupling_names(depth).items()}
    return {name: tensor.detach().clone() for name, tensor in named.items()}


def main() -> None:
    args = parse_args(__doc__, REPO, COMMIT)
    prepare_dassl(args.checkout, args.dassl)
    from dassl.config import get_cfg_default  # noqa: PLC0415  (the official code, now on sys.path)

    official_train = importlib.import_module("train")  # its extend_cfg; registers the trainers
    maple = importlib.import_module("trainers.maple")

    cfg = get_cfg_default()
    official_train.extend_cfg(cfg)
    cfg.merge_from_file(str(args.checkout / CONFIG))
    cfg.merge_from_list(
        # scripts/maple/base2new_train_maple.sh, the tiny CLIP's image size and depth, fp32
        ["DATASET.NUM_SHOTS", 16, "DATASET.SUBSAMPLE_CLASSES", "base", "DATASET.NAME", DATASET_NAME]
        + ["INPUT.SIZE", (32, 32), "TRAINER.MAPLE.PREC", "fp32", "TRAINER.MAPLE.PROMPT_DEPTH", DEPTH]
    )
    cfg.freeze()

    plain = {"trainer": "CoOp", "vision_depth": 0, "language_depth": 0, "vision_ctx": 0, "language_ctx": 0}
    clip, fixture = official_clip(REPO, COMMIT, WIDE, design=plain)
    torch.manual_seed(1)
    trainer = dassl_trainer(maple.MaPLe, cfg, fixture["classnames"])
    model = trainer.model
    learned = {name: p for name, p in model.named_parameters() if p.requires_grad}
    images, labels = normalise(fixture["pixels"]), fixture["labels"]

    # the couplings' weights (393,216 numbers each) start from seeded values, not stored
    fixture["seeded_init"] = seeds = seed_large(learned, coupling_names(DEPTH))
    fixture["init"] = {k: v for k, v in project_names(learned, DEPTH).items() if k not in seeds}
    fixture["same_init"] = ["prompt_learner.ctx"]  # "a photo": no random draw
    model.eval()
    with torch.no_grad():
        fixture["logits"] = model(images)
        model.train()
        fixture["loss"] = {"ce": model(images, labels)}  # forward_backward's loss
    trainer.set_model_mode("train")
    summary, grads = dassl_step(trainer, cfg, learned, images, labels, fixture)
    assert abs(summary["loss"] - fixture["loss"]["ce"].item()) < 1e-6
    fixture["grads"] = store_grads(project_names(grads, DEPTH), seeds)
    save("maple", fixture, args.out)


if __name__ == "__main__":
    main()

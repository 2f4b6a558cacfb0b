"""MMRL's parity fixture: the official code (yunncheng/MMRL, trainers/mmrl.py, clip/model_mmrl.py) run
on the project's tiny CLIP.

    PYTHONPATH=. python experiments/parity/mmrl.py /tmp/MMRL --dassl /tmp/Dassl.pytorch

The official trainer (class MMRL) is built by its own `build_model()` from its base-to-new config
as train.py composes it (configs/trainers/MMRL/vit_b16.yaml: 5 tokens of dimension 512, alpha 0.7,
AdamW lr 0.001, batch 4, 10 epochs; then trainers/config.py's Oxford Pets weight 0.2; base
classes, TASK B2N), with the tokens in both blocks of coop-tiny (REP_LAYERS [1, 2]: inserted
entering block 1, replaced entering block 2; the recipe's 6-12 need 12 blocks), and runs its own
`forward_backward` on the fixed batch. In fp32 (the recipe: amp). The two Linears from the
512-dimensional tokens (32,768 numbers each) start from seeded values instead of being stored, and
their gradients are stored as sketches (common.py). Stored: the initial tokens, Linears and
`proj_rep`, the fused logits (eval mode), the loss terms as the official MMRL_Loss adds them (`ce`
= 0.7 x CE, `ce_rep` = 0.3 x CE of the representation logits, `reg_image` and `reg_text` = 0.2 x
(1 - mean cos) to frozen CLIP's features), the gradients at the optimiser's step, the optimiser's
settings and the lr of each epoch.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from experiments.parity.common import (
    DATASET_NAME,
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

REPO = "yunncheng/MMRL"
COMMIT = "27d8821f6ac135a1d0c8e4c5ed78af14df0cd82e"
CONFIG = "configs/trainers/MMRL/vit_b16.yaml"
REP_LAYERS = [1, 2]  # both blocks of coop-tiny
LARGE = 10_000  # the Linears from the tokens: seeded, their gradients sketched


def project_names(layers: int) -> dict[str, str]:
    """The official parameters' names -> the project's."""
    learner = "representation_learner."
    names = {
        learner + "compound_rep_tokens": "representation",
        "image_encoder.proj_rep": "proj_rep",
    }
    for i in range(layers):
        for kind in ("weight", "bias"):
            names[f"{learner}compound_rep_tokens_r2vproj.{i}.{kind}"] = f"to_image.{i}.{kind}"
            names[f"{learner}compound_rep_tokens_r2tproj.{i}.{kind}"] = f"to_text.{i}.{kind}"
    return names


def main() -> None:
    args = parse_args(__doc__, REPO, COMMIT)
    prepare_dassl(args.checkout, args.dassl)
    from dassl.config import get_cfg_default  # noqa: PLC0415  (the official code, now on sys.path)

    official_train = importlib.import_module("train")  # its extend_cfg; registers the trainers
    mmrl = importlib.import_module("trainers.mmrl")
    dataset_config = importlib.import_module("trainers.config").get_dataset_specified_config

    cfg = get_cfg_default()
    official_train.extend_cfg(cfg)
    cfg.merge_from_file(str(args.checkout / CONFIG))
    cfg.merge_from_list(["TRAINER.NAME", "MMRL", "DATASET.NAME", DATASET_NAME])
    cfg.merge_from_list(dataset_config(dataset=DATASET_NAME, trainer="MMRL", task="B2N"))
    cfg.merge_from_list(
        # scripts/mmrl/base2new_train.sh, the tiny CLIP's image size and blocks, fp32
        ["DATASET.NUM_SHOTS", 16, "DATASET.SUBSAMPLE_CLASSES", "base", "TASK", "B2N"]
        + ["INPUT.SIZE", (32, 32), "TRAINER.MMRL.PREC", "fp32", "TRAINER.MMRL.REP_LAYERS", REP_LAYERS]
    )
    cfg.freeze()
    assert cfg.TRAINER.MMRL.REG_WEIGHT == 0.2

    plain = {"model": "CLIP", "rep_tokens_layers": REP_LAYERS, "n_rep_tokens": 5}
    loading = {"models": ("model", "model_mmrl"), "builders": ("build_model_MMRL", "build_model")}
    clip, fixture = official_clip(REPO, COMMIT, design=plain, **loading)
    torch.manual_seed(1)
    trainer = dassl_trainer(mmrl.MMRL, cfg, fixture["classnames"])
    model = trainer.model
    names = project_names(len(REP_LAYERS))
    learned = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert learned.keys() == names.keys(), sorted(learned)
    images, labels = normalise(fixture["pixels"]), fixture["labels"]

    fixture["seeded_init"] = seeds = seed_large(learned, names, LARGE)
    fixture["init"] = {names[n]: p.detach().clone() for n, p in learned.items() if names[n] not in seeds}
    model.eval()
    with torch.no_grad():
        fixture["logits"] = model(images)[2]  # fused: base classes, TASK B2N
        model.train()
        # the terms MMRL_Loss adds, from the official forward and frozen encoders
        logits, logits_rep, _, image, text = model(images)
        clip_image = F.normalize(trainer.image_encoder_clip(images), dim=-1)
        clip_text = trainer.text_features_clip
        alpha, weight = cfg.TRAINER.MMRL.ALPHA, cfg.TRAINER.MMRL.REG_WEIGHT
        fixture["loss"] = {
            "ce": alpha * F.cross_entropy(logits, labels),
            "ce_rep": (1 - alpha) * F.cross_entropy(logits_rep, labels),
            "reg_image": weight * (1 - F.cosine_similarity(image, clip_image, dim=1).mean()),
            "reg_text": weight * (1 - F.cosine_similarity(text, clip_text, dim=1).mean()),
        }
        official = trainer.criterion(logits, logits_rep, image, text, clip_image, clip_text, labels)
    total = sum(fixture["loss"].values())
    assert abs(official - total) < 1e-6, (official, total)
    trainer.set_model_mode("train")
    summary, grads = dassl_step(trainer, cfg, learned, images, labels, fixture)
    assert abs(summary["loss"] - total.item()) < 1e-6, (summary["loss"], total)
    fixture["grads"] = store_grads({names[n]: g for n, g in grads.items()}, seeds)
    fixture["rep_layers"] = REP_LAYERS
    save("mmrl", fixture, args.out)


if __name__ == "__main__":
    main()

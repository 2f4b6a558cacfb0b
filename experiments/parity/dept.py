"""DePT's parity fixture (on CoOp): the official code (Koorye/DePT) run on the project's tiny CLIP.

    PYTHONPATH=. python experiments/parity/dept.py /tmp/DePT --dassl /tmp/Dassl.pytorch

The official trainer `trainers/elp_coop.py` (class ExtrasLinearProbeCoOp: CoOp with the channel-
adjusted transfer head) is built by its own `build_model()` from its base-to-new recipe (train.py's
`extend_cfg`: head lr 6.5 x 0.0035, weight 0.7, fused test logits; configs/trainers/
ExtrasLinearProbeCoOp/vit_b16_ep10_bs4_lr35.yaml: batch 4, 10 epochs; 16 random context vectors),
on the base classes of Oxford Pets, and runs its own `forward_backward` on the fixed batch. Its
trainers import plotnine (a plotting library they never call), which is not installed here: an
empty module stands in for it. Stored: the initial context and head, the fused logits (eval mode),
the loss terms (`ce` = 0.3 x CE of the CoOp logits, `cat` = 0.7 x CE of the head over images and
text features, as the official `_loss` weighs them), the gradients at the optimiser's step, the
optimiser's settings and the lr of each epoch for both groups (prompt, head).
"""

from __future__ import annotations

import importlib
import sys
import types

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
)

REPO = "Koorye/DePT"
COMMIT = "d4ff41684bac42da30ebb6898496772dec3157f2"
CONFIG = "configs/trainers/ExtrasLinearProbeCoOp/vit_b16_ep10_bs4_lr35.yaml"
NAMES = {  # the official parameters' names -> the project's
    "prompt_learner.ctx": "base.prompt_learner.ctx",
    "film_lp_img.scale": "head.image_cwt.scale",
    "film_lp_img.bias": "head.image_cwt.shift",
    "film_lp_text.scale": "head.text_cwt.scale",
    "film_lp_text.bias": "head.text_cwt.shift",
    "linear_probe_proj.weight": "head.linear.weight",
    "linear_probe_proj.bias": "head.linear.bias",
}


def main() -> None:
    args = parse_args(__doc__, REPO, COMMIT)
    prepare_dassl(args.checkout, args.dassl)
    sys.modules.setdefault("plotnine", types.ModuleType("plotnine"))  # imported, never used
    from dassl.config import clean_cfg, get_cfg_default  # noqa: PLC0415  (the official code, on sys.path)

    official_train = importlib.import_module("train")  # its extend_cfg; registers the trainers
    elp_coop = importlib.import_module("trainers.elp_coop")

    cfg = get_cfg_default()
    clean_cfg(cfg, "COOP")
    official_train.extend_cfg(cfg)
    cfg.merge_from_file(str(args.checkout / CONFIG))
    cfg.merge_from_list(
        # configs.py's coop_dept (base-to-new, 16 shots), the tiny CLIP's image size, fp32
        ["DATASET.NUM_SHOTS", 16, "DATASET.SUBSAMPLE_CLASSES", "base", "DATASET.NAME", DATASET_NAME]
        + ["INPUT.SIZE", (32, 32), "TRAINER.COOP.PREC", "fp32"]
    )
    cfg.freeze()

    clip, fixture = official_clip(REPO, COMMIT)
    torch.manual_seed(1)
    trainer = dassl_trainer(elp_coop.ExtrasLinearProbeCoOp, cfg, fixture["classnames"])
    model = trainer.model
    learned = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert learned.keys() == NAMES.keys(), sorted(learned)
    images, labels = normalise(fixture["pixels"]), fixture["labels"]

    fixture["init"] = {NAMES[n]: p.detach().clone() for n, p in learned.items()}
    fixture["same_init"] = [NAMES[n] for n in NAMES if n.startswith("film")]  # ones and zeros
    model.eval()
    with torch.no_grad():
        fixture["logits"] = model(images)  # fused: base classes, TEST_TIME_FUSION
        model.train()
        # the terms of the official `_loss`, from its own forward pieces
        text, image = model._forward_feats(images)
        logits = model._forward_logits_similarity(text, image)
        head_logits, head_labels = model._forward_logits_linear_probe(text, image, labels)
        weight = cfg.TRAINER.LINEAR_PROBE.WEIGHT
        fixture["loss"] = {
            "ce": (1 - weight) * F.cross_entropy(logits, labels),
            "cat": weight * F.cross_entropy(head_logits, head_labels),
        }
    trainer.set_model_mode("train")
    summary, grads = dassl_step(trainer, cfg, learned, images, labels, fixture)
    total = sum(fixture["loss"].values()).item()
    assert abs(summary["loss"] - total) < 1e-6, (summary["loss"], total)
    fixture["grads"] = {NAMES[n]: g for n, g in grads.items()}
    save("dept", fixture, args.out)


if __name__ == "__main__":
    main()

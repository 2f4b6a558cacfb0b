"""KgCoOp's parity fixture: the official code (htyao89/KgCoOp) run on the project's tiny CLIP.

    PYTHONPATH=. python experiments/parity/kgcoop.py /tmp/KgCoOp

The official trainer `trainers/kgcoop.py` (class KgCoOp, on the Dassl fork the repository ships,
Dassl.ProGrad.pytorch) is built by its own `build_model()` from its base-to-new config
(configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml with the options of scripts/base2new_train.sh:
4 context words, W = 8.0) on the Oxford Pets template, and runs its own `forward_backward` on the
fixed batch. Stored: the initial context, the logits, the loss terms (`ce`, `kg` = W x (1 - mean
cos)), the context's gradient at the optimiser's step, the optimiser's settings and its learning
rate in each of the 100 epochs. In fp32 throughout: the official PromptLearner computes the
hand-made prompts' text features with a second CLIP it leaves in fp16 (common.py, `cpu_fp32`).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from experiments.parity.common import (
    BATCH,
    DATASET_NAME,
    dassl_step,
    dassl_trainer,
    normalise,
    official_clip,
    parse_args,
    prepare_dassl,
    save,
)

REPO = "htyao89/KgCoOp"
COMMIT = "c43ccc32c8739f64b165cfa205fcc6c0f5bb5b17"
CONFIG = "configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml"


def main() -> None:
    args = parse_args(__doc__, REPO, COMMIT)
    code = args.checkout / "KgCoOp"
    prepare_dassl(code, args.checkout / "Dassl.ProGrad.pytorch")
    from dassl.config import get_cfg_default  # noqa: PLC0415  (the official code, now on sys.path)

    official_train = importlib.import_module("train")  # its extend_cfg; registers the trainers
    kgcoop = importlib.import_module("trainers.kgcoop")

    cfg = get_cfg_default()
    official_train.extend_cfg(cfg)
    cfg.merge_from_file(str(code / CONFIG))
    cfg.merge_from_list(
        # scripts/base2new_train.sh (the README's weight 8.0), the tiny CLIP's image size, fp32
        ["TRAINER.COOP.N_CTX", 4, "TRAINER.COOP.CSC", False, "TRAINER.COOP.W", 8.0]
        + ["TRAINER.COOP.CLASS_TOKEN_POSITION", "end", "DATASET.NUM_SHOTS", 16]
        + ["DATASET.SUBSAMPLE_CLASSES", "base", "DATASET.NAME", DATASET_NAME]
        + ["INPUT.SIZE", (32, 32), "TRAINER.COOP.PREC", "fp32"]
    )
    cfg.freeze()

    clip, fixture = official_clip(REPO, COMMIT)
    torch.manual_seed(1)
    trainer = dassl_trainer(kgcoop.KgCoOp, cfg, fixture["classnames"])
    model = trainer.model
    ctx = model.prompt_learner.ctx
    images, labels = normalise(fixture["pixels"]), fixture["labels"]
    assert len(labels) == BATCH

    fixture["init"] = {"prompt_learner.ctx": ctx.detach().clone()}
    fixture["same_init"] = ["prompt_learner.ctx"]  # the words "a photo of a": no random draw
    with torch.no_grad():
        logits, score = model(images)
    # the terms of forward_backward's `loss = F.cross_entropy(output, label) + self.w * score`
    fixture["logits"] = logits
    fixture["loss"] = {"ce": F.cross_entropy(logits, labels), "kg": trainer.w * score}
    summary, grads = dassl_step(trainer, cfg, {"prompt_learner.ctx": ctx}, images, labels, fixture)
    total = sum(fixture["loss"].values()).item()
    assert abs(summary["loss"] - total) < 1e-6, (summary["loss"], total)
    fixture["grads"] = grads
    save("kgcoop", fixture, args.out)


if __name__ == "__main__":
    main()

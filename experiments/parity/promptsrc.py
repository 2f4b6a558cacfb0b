"""PromptSRC's parity fixture: the official code (muzairkhattak/PromptSRC, trainers/promptsrc.py) run
on the project's tiny CLIP.

    PYTHONPATH=. python experiments/parity/promptsrc.py /tmp/PromptSRC --dassl /tmp/Dassl.pytorch

The official trainer (class PromptSRC) is built by its own `build_model()` from its base-to-new
config (configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml: IVLP's 4 + 4 tokens, SGD lr
0.0025, batch 4, 20 epochs, text and image L1 weights 25 and 10, GPA mean 15 and std 1) with the
prompts in both blocks of each tower of coop-tiny, and runs its own `forward_backward` on the fixed
batch. Its frozen teacher (the 60 ImageNet templates' mean text features, the frozen image
encoder) is fp16 in the official code whatever the precision; here fp32, as the rest (common.py).
Stored: the initial prompts, the logits (eval mode), the loss terms (`ce`, `scl_text`,
`scl_image`, `scl_logits`, as forward_backward computes them), the gradients at the optimiser's
step, the optimiser's settings, the lr of each epoch and GPA's weight of each epoch.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from experiments.parity.common import (
    DASSL_FIXTURES,
    dassl_step,
    dassl_trainer,
    normalise,
    official_clip,
    parse_args,
    prepare_dassl,
    released_check,
    save,
)
from experiments.parity.ivlp import COMMIT, DEPTH, REPO, official_cfg, project_names

CONFIG = "configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml"


def main() -> None:
    args = parse_args(__doc__, REPO, COMMIT)
    prepare_dassl(args.checkout, args.dassl)
    cfg = official_cfg(args.checkout, "PROMPTSRC", CONFIG, [])
    promptsrc = importlib.import_module("trainers.promptsrc")

    plain = {"trainer": "IVLP", "vision_depth": 0, "language_depth": 0, "vision_ctx": 0, "language_ctx": 0}
    clip, fixture = official_clip(REPO, COMMIT, design=plain)
    torch.manual_seed(1)
    trainer = dassl_trainer(promptsrc.PromptSRC, cfg, fixture["classnames"])
    model = trainer.model
    learned = {name: p for name, p in model.named_parameters() if p.requires_grad}
    images, labels = normalise(fixture["pixels"]), fixture["labels"]

    fixture["init"] = project_names(learned, DEPTH)
    fixture["same_init"] = ["prompt_learner.ctx"]  # "a photo of a": no random draw
    model.eval()
    with torch.no_grad():
        fixture["logits"] = model(images)
        model.train()
        ce, text, zs_text, zs_image, image, zs_logits, logits = model(images, labels)
    # forward_backward's terms, as it writes them
    weights = cfg.TRAINER.PROMPTSRC
    log_p, log_q = F.log_softmax(logits, dim=1), F.log_softmax(zs_logits, dim=1)
    kl = F.kl_div(log_p, log_q, reduction="sum", log_target=True)
    fixture["loss"] = {
        "ce": ce,
        "scl_text": F.l1_loss(text, zs_text, reduction="mean") * weights.TEXT_LOSS_WEIGHT,
        "scl_image": F.l1_loss(image, zs_image, reduction="mean") * weights.IMAGE_LOSS_WEIGHT,
        "scl_logits": kl / logits.numel(),
    }
    fixture["gpa_weights"] = torch.tensor(trainer.gauss)
    trainer.set_model_mode("train")
    summary, grads = dassl_step(trainer, cfg, learned, images, labels, fixture)
    total = sum(fixture["loss"].values()).item()
    assert abs(summary["loss"] - total) < 1e-6, (summary["loss"], total)
    fixture["grads"] = project_names(grads, DEPTH)
    # the stepped model as Dassl's save_model writes it (the whole model, 1.5 MB on this CLIP), for
    # tests/test_released_prompts.py
    folder = args.out.parent / "dassl_promptsrc" if args.out else DASSL_FIXTURES / "promptsrc"
    fixture["released_checkpoint"] = released_check(trainer, clip, fixture["classnames"], images, folder)
    save("promptsrc", fixture, args.out)


if __name__ == "__main__":
    main()

"""ProGrad's parity fixture: the official code (BeierZhu/Prompt-align, ProGrad.public) run on the
project's tiny CLIP.

    PYTHONPATH=. python experiments/parity/prograd.py /tmp/Prompt-align

The official trainer `trainers/prograd.py` (class ProGrad, on the Dassl fork the repository ships,
Dassl.ProGrad.pytorch, whose `prograd_backward_and_update` projects the gradient) is built by its
own `build_model()` from its few-shot config (configs/trainers/ProGrad/rn50.yaml with the options of
scripts/prograd.sh: 16 context vectors, lambda 1, T 1, 16 shots, 200 epochs) for Caltech101
(official template "a photo of a {}.": the context is 12 zeros, then "a photo of a"). For Oxford
Pets ("a type of pet, a photo of a {}.": 8 words, 9 tokens) and DTD ("a texture of {}.") it also
stores the initial context and class text features the official prompt learner builds
from its template. It runs its own `forward_backward` on the fixed images, with labels
for which the CE gradient conflicts with the KL one, so that the projection acts. Stored: the
initial context, the logits, the zero-shot logits, the loss terms (`ce`, and `kl` as the official
loss writes it: the cross-entropy to the zero-shot prediction), the CE and KL gradients, the
projected gradient at the optimiser's step, the optimiser's settings and the lr of each epoch.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from experiments.parity.common import (
    dassl_step,
    dassl_trainer,
    normalise,
    official_clip,
    parse_args,
    prepare_dassl,
    save,
)

REPO = "BeierZhu/Prompt-align"
COMMIT = "1b762036cbe97ecf504e17bb94d89191679e4e6e"
CONFIG = "configs/trainers/ProGrad/rn50.yaml"
DATASET = "Caltech101"  # its official template is the project's caltech101 template
TEMPLATE = "a photo of a {}."
LABELS = [3, 0, 0, 4]
# Datasets whose official template puts words the project's does not into the initial context (the
# project reads them from conf/method/prograd.yaml): the context, the prompts and the class text
# features the official prompt learner starts from, before any step.
TEMPLATE_INITS = {"OxfordPets": "oxford_pets", "DescribableTextures": "dtd"}


def main() -> None:
    args = parse_args(__doc__, REPO, COMMIT)
    code = args.checkout / "ProGrad.public"
    prepare_dassl(code, args.checkout / "Dassl.ProGrad.pytorch")
    from dassl.config import get_cfg_default  # noqa: PLC0415  (the official code, now on sys.path)

    official_train = importlib.import_module("train")  # its extend_cfg; registers the trainers
    prograd = importlib.import_module("trainers.prograd")
    assert prograd.CUSTOM_TEMPLATES[DATASET] == TEMPLATE

    def config(dataset: str) -> Any:
        cfg = get_cfg_default()
        official_train.extend_cfg(cfg)
        cfg.merge_from_file(str(code / CONFIG))
        cfg.merge_from_list(
            # scripts/prograd.sh (16 shots, 16 context vectors), the tiny CLIP's image size, fp32
            ["LOSS.LAMBDA", 1.0, "TRAINER.COOP.N_CTX", 16, "TRAINER.COOP.CSC", False]
            + ["TRAINER.COOP.CLASS_TOKEN_POSITION", "end", "DATASET.NUM_SHOTS", 16, "DATASET.NAME", dataset]
            + ["INPUT.SIZE", (32, 32), "TRAINER.COOP.PREC", "fp32"]
        )
        cfg.freeze()
        return cfg

    clip, fixture = official_clip(REPO, COMMIT)
    fixture["template"] = TEMPLATE
    fixture["template_inits"] = {}
    for dataset, name in TEMPLATE_INITS.items():
        model = dassl_trainer(prograd.ProGrad, config(dataset), fixture["classnames"]).model
        with torch.no_grad():
            prompts = model.prompt_learner()
            features = model.text_encoder(prompts, model.tokenized_prompts)
        fixture["template_inits"][name] = {
            "template": prograd.CUSTOM_TEMPLATES[dataset],
            "ctx": model.prompt_learner.ctx.detach().clone(),
            "text_features": features,
        }
    cfg = config(DATASET)
    torch.manual_seed(1)
    trainer = dassl_trainer(prograd.ProGrad, cfg, fixture["classnames"])
    ctx = trainer.model.prompt_learner.ctx
    images = normalise(fixture["pixels"])

    fixture["init"] = {"prompt_learner.ctx": ctx.detach().clone()}
    fixture["same_init"] = ["prompt_learner.ctx"]  # zeros, then the words: no random draw
    with torch.no_grad():
        zero_shot = trainer.zs_clip(images)
    # labels for which the CE gradient conflicts with the KL one (cosine -0.50, found by trying all
    # 5^4 labellings of the batch): the projection acts, and leaves half the gradient
    fixture["labels"] = labels = torch.tensor(LABELS)
    logits = trainer.model(images)
    ce, kl = trainer.criterion(logits, zero_shot, labels)
    ce_grad, kl_grad = (torch.autograd.grad(loss, ctx, retain_graph=True)[0] for loss in (ce, kl))
    dot = torch.dot(ce_grad.flatten(), kl_grad.flatten())
    assert dot < 0, f"no conflict ({dot}): the projection would not act"
    fixture["logits"], fixture["zero_shot_logits"] = logits.detach(), zero_shot
    fixture["loss"] = {"ce": ce.detach(), "kl": kl.detach()}
    fixture["ce_grad"], fixture["kl_grad"] = ce_grad, kl_grad
    summary, grads = dassl_step(trainer, cfg, {"prompt_learner.ctx": ctx}, images, labels, fixture)
    assert abs(summary["xe_loss"] - ce.item()) < 1e-6 and abs(summary["kl_loss"] - kl.item()) < 1e-6
    assert not torch.allclose(grads["prompt_learner.ctx"], ce_grad)  # projected
    fixture["grads"] = grads
    save("prograd", fixture, args.out)


if __name__ == "__main__":
    main()

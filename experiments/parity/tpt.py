"""TPT's parity fixture: the official code (azshue/TPT) run on the project's tiny CLIP.

    PYTHONPATH=. python experiments/parity/tpt.py /tmp/TPT

The official model (`clip.custom_clip.get_coop`, with scripts/test_tpt.sh's 4 context tokens from
"a photo of a", class names reset as `main_worker` does) and its AdamW (lr 5e-3, created as
`main_worker` creates it) run through the official `test_time_adapt_eval` unchanged (`--tpt`, 1
step, 10 % of the views kept) on one test image: the fixed batch's first image and 63 seeded
images as its augmented views (`views`: the views' content does not matter for the computation).
The official `clip.load` can only load OpenAI's TorchScript archives (it reads their
`state_dict()` even when it builds from a state dict), so `torch.jit.load` of the tiny CLIP's
file gives an object with that `state_dict()` (common.py). Recorded without changing them: the
views' logits and the selected views (`select_confident_samples`), the loss (`avg_entropy`), the
context's gradient at the AdamW step, the tuned context, and the image's logits after tuning
(what `accuracy` sees).
"""

from __future__ import annotations

import importlib
import sys
from types import SimpleNamespace
from typing import Any

import torch

from experiments.parity.common import (
    batch,
    check_same_clip,
    common_fields,
    cpu_fp32,
    normalise,
    optimizer_settings,
    parse_args,
    project_clip,
    put_on_path,
    save,
    tiny_state,
    use_tiny_weights,
)

REPO = "azshue/TPT"
COMMIT = "63ecbace79694205d7884e63fdc3137a200f0b0e"
VIEWS, VIEW_SEED = 63, 300


def views(pixels: torch.Tensor) -> torch.Tensor:
    """The test image (the fixed batch's first) and its VIEWS views: seeded images."""
    return torch.cat([pixels[:1], batch(VIEWS, VIEW_SEED)[0]])


def main() -> None:
    args = parse_args(__doc__, REPO, COMMIT)
    put_on_path(args.checkout)
    cpu_fp32()
    tpt = importlib.import_module("tpt_classification")
    custom_clip = importlib.import_module("clip.custom_clip")

    clip = project_clip()
    fixture = common_fields(clip, REPO, COMMIT)
    build_model = use_tiny_weights(clip, jit_archive=True)
    check_same_clip(build_model(tiny_state(clip)), clip)

    # scripts/test_tpt.sh and tpt_classification.py's defaults
    sys.argv = ["tpt_classification.py", "data", "--tpt", "--ctx_init", "a_photo_of_a", "--test_sets", "Pets"]
    run_args = SimpleNamespace(
        gpu=0, tpt=True, cocoop=False, tta_steps=1, selection_p=0.1, lr=5e-3, n_ctx=4, print_freq=200
    )
    # on the CPU: main_worker passes the GPU's id as the device
    model = custom_clip.get_coop("ViT-B/16", "Pets", "cpu", run_args.n_ctx, "a_photo_of_a")
    for name, param in model.named_parameters():  # main_worker's
        if "prompt_learner" not in name:
            param.requires_grad_(False)
    model.reset_classnames(fixture["classnames"], "ViT-B/16")
    ctx = model.prompt_learner.ctx
    records: dict[str, Any] = {}

    class RecordingAdamW(torch.optim.AdamW):
        """The official AdamW, recording the context's gradient at its step."""

        def step(self, *step_args: Any, **kwargs: Any) -> Any:
            records["grads"] = {"prompt_learner.ctx": ctx.grad.detach().clone()}
            return super().step(*step_args, **kwargs)

    optimizer = RecordingAdamW(model.prompt_learner.parameters(), run_args.lr)  # main_worker's
    optim_state = optimizer.state_dict()
    scaler = torch.cuda.amp.GradScaler(init_scale=1000)  # disabled without CUDA: a plain step

    select, entropy, accuracy = tpt.select_confident_samples, tpt.avg_entropy, tpt.accuracy

    def recording_select(logits: torch.Tensor, top: float) -> Any:
        records["view_logits"] = logits.detach().clone()
        selected, idx = select(logits, top)
        records["selected"] = idx.clone()
        return selected, idx

    def recording_entropy(outputs: torch.Tensor) -> torch.Tensor:
        records["loss"] = loss = entropy(outputs)
        return loss

    def recording_accuracy(output: torch.Tensor, target: torch.Tensor, topk: tuple = (1,)) -> Any:
        records["logits"] = output.detach().clone()
        records["tuned_ctx"] = ctx.detach().clone()
        return accuracy(output, target, topk)

    tpt.select_confident_samples, tpt.avg_entropy = recording_select, recording_entropy
    tpt.accuracy = recording_accuracy
    fixture["init"] = {"prompt_learner.ctx": ctx.detach().clone()}
    fixture["same_init"] = ["prompt_learner.ctx"]
    images = normalise(views(fixture["pixels"]))
    loader = [([image[None] for image in images], fixture["labels"][:1])]
    tpt.test_time_adapt_eval(loader, model, None, optimizer, optim_state, scaler, run_args)

    fixture["view_logits"], fixture["selected"] = records["view_logits"], records["selected"]
    fixture["loss"] = {"entropy": records["loss"].detach()}
    fixture["grads"], fixture["tuned_ctx"] = records["grads"], records["tuned_ctx"]
    fixture["logits"] = records["logits"]
    fixture["optimizer"] = optimizer_settings(optimizer)
    fixture["lr"] = [[group["lr"] for group in optimizer.param_groups]]
    fixture["views"] = {"count": VIEWS, "seed": VIEW_SEED}
    save("tpt", fixture, args.out)


if __name__ == "__main__":
    main()

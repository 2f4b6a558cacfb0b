"""CLIP-LoRA's parity fixture: the official code (MaxZanella/CLIP-LoRA) run on the project's tiny CLIP.

    PYTHONPATH=. python experiments/parity/clip_lora.py /tmp/CLIP-LoRA

The official training function `lora.run_lora` runs unchanged, on the official `clip.load`'s model
(here with the tiny CLIP's weights, common.py), with the official defaults of `run_utils.py`
(rank 2, alpha 1, q, k, v of every block of both encoders, lr 2e-4, 500 x shots iterations; 1 shot:
500) and main.py's logit scale 100, the Oxford Pets dataset's official template ("a photo of a
{}.") and a train loader that gives the fixed batch at every iteration. Where the official code
draws what cannot be drawn alike, the script sets it: the adapters' dropout rate is 1e-12 (the
official training path with dropout, whose masks then keep every input; the default 0.25 draws
random masks), and the adapters' B matrices, which start at zero (where the A gradients are zero),
start from seeded values (wrapping `apply_lora`, as `load_lora` would load them). What the official
loop computes is recorded without changing it: the first cross-entropy call's logits and loss, the
adapters' gradients at the first optimiser step and the learning rate at every step (the
optimiser is AdamW recording its steps; the accuracy it prints is computed as NumPy 2 allows,
`accuracy_numpy2`). Stored: the initial adapters, the logits, the loss
(`ce`), those gradients, the optimiser's settings and the lr of each of the 500 iterations.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace
from typing import Any

import torch

from experiments.parity.common import (
    check_same_clip,
    common_fields,
    cpu_fp32,
    normalise,
    optimizer_settings,
    parse_args,
    project_clip,
    put_on_path,
    save,
    seeded,
    tiny_state,
    use_tiny_weights,
)

REPO = "MaxZanella/CLIP-LoRA"
COMMIT = "358f0d7361f59e66c0b2d0b672a3dafb143a759b"
DROPOUT = 1e-12  # dropout's code path, masks that keep every input
SHOTS = 1


def project_name(official: str) -> str:
    """transformer.resblocks.0.attn.q_proj.w_lora_A -> model.transformer.resblocks.0.attn.q_proj
    .lora_A.default.weight (PEFT's LoRA Linear in the project's copy of CLIP)."""
    module, kind = official.rsplit(".w_lora_", 1)
    return f"model.{module}.lora_{kind}.default.weight"


def accuracy_numpy2(output: torch.Tensor, target: torch.Tensor, topk: int = 1) -> float:
    """The official `utils.cls_acc` (the accuracy it prints), whose `float()` of a one-element array
    NumPy 2 refuses, with `.item()` instead."""
    pred = output.topk(topk, 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return 100 * correct[:topk].reshape(-1).float().sum().item() / target.shape[0]


def main() -> None:
    args = parse_args(__doc__, REPO, COMMIT)
    put_on_path(args.checkout)
    cpu_fp32()
    official_args = importlib.import_module("run_utils").get_arguments  # the official defaults
    lora = importlib.import_module("lora")
    template = importlib.import_module("datasets.oxford_pets").template

    clip = project_clip()
    fixture = common_fields(clip, REPO, COMMIT)
    fixture["template"] = template[0]
    build_model = use_tiny_weights(clip)
    check_same_clip(build_model(tiny_state(clip)), clip)
    official_clip = importlib.import_module("clip").load("ViT-B/16", device="cpu")[0].eval()
    images, labels = normalise(fixture["pixels"]), fixture["labels"]

    import sys  # noqa: PLC0415

    sys.argv = ["main.py", "--shots", str(SHOTS), "--dropout_rate", str(DROPOUT)]
    run_args = official_args()
    dataset = SimpleNamespace(classnames=fixture["classnames"], template=template)
    learned: dict[str, torch.nn.Parameter] = {}
    apply_lora = lora.apply_lora

    def apply_lora_from_given_values(args: Any, clip_model: torch.nn.Module) -> list:
        layers = apply_lora(args, clip_model)
        torch.manual_seed(1)
        for i, (name, param) in enumerate(clip_model.named_parameters()):
            if "lora_" in name:
                learned[name] = param
                if name.endswith("w_lora_B"):
                    with torch.no_grad():
                        param.copy_(0.1 * seeded(param.shape, 2000 + i))
        fixture["init"] = {project_name(n): p.detach().clone() for n, p in learned.items()}
        return layers

    records: dict[str, Any] = {"lr": []}

    class RecordingAdamW(torch.optim.AdamW):
        """The official AdamW, recording the gradients at its first step and the lr at each."""

        def step(self, *step_args: Any, **kwargs: Any) -> Any:
            if "grads" not in records:
                records["grads"] = {project_name(n): p.grad.detach().clone() for n, p in learned.items()}
                records["optimizer"] = optimizer_settings(self)
            records["lr"].append([group["lr"] for group in self.param_groups])
            return super().step(*step_args, **kwargs)

    cross_entropy = torch.nn.functional.cross_entropy

    def recording_cross_entropy(logits: torch.Tensor, target: torch.Tensor, *a: Any, **k: Any) -> Any:
        loss = cross_entropy(logits, target, *a, **k)
        records.setdefault("logits", logits.detach().clone())
        records.setdefault("ce", loss.detach().clone())
        return loss

    lora.apply_lora = apply_lora_from_given_values
    lora.cls_acc = accuracy_numpy2
    torch.optim.AdamW = RecordingAdamW
    torch.nn.functional.cross_entropy = recording_cross_entropy
    loader = [(images, labels)]
    lora.run_lora(run_args, official_clip, 100, dataset, loader, loader, loader)
    torch.nn.functional.cross_entropy = cross_entropy

    assert len(records["lr"]) == run_args.n_iters * SHOTS
    fixture["logits"], fixture["loss"] = records["logits"], {"ce": records["ce"]}
    fixture["grads"], fixture["optimizer"] = records["grads"], records["optimizer"]
    fixture["lr"] = records["lr"]
    fixture["recipe"] = {"batch_size": run_args.batch_size, "steps": len(records["lr"])}
    fixture["dropout"] = DROPOUT
    save("clip_lora", fixture, args.out)


if __name__ == "__main__":
    main()

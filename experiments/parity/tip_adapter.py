"""Tip-Adapter's and Tip-Adapter-F's parity fixture: the official code (gaopengcuhk/Tip-Adapter) run
on the project's tiny CLIP.

    PYTHONPATH=. python experiments/parity/tip_adapter.py /tmp/Tip-Adapter

The official functions of utils.py and main.py run unchanged, in main()'s order, with the Oxford
Pets config (configs/oxford_pets.yaml: init alpha 1.17, beta 1, search grid 200 x 20 on scales 7
and 3, 10 augmented views, AdamW lr 0.001, 20 epochs) and the official Oxford Pets template, on the
official `clip.load`'s model with the tiny CLIP's weights (common.py): `clip_classifier`;
`build_cache_model` on a loader giving, at each of the 10 augmentation epochs, another view of the
5 cache images (one per class; the views are the images plus seeded noise: `views`); `pre_load_features` of a
validation set (the first two views: `validation`) and of the fixed batch as the test set; `run_tip_adapter`
(its search on the validation set); `run_tip_adapter_F` on a train loader giving the fixed batch
once per epoch (20 steps). Recorded without changing them: the logits that main.py's accuracy
calls see (NumPy 2 refuses the official accuracy's `float()` of a one-element array: computed
with `.item()`), the (beta, alpha) `search_hp` returns, and of Tip-Adapter-F's training the first
cross-entropy's logits and loss, the keys' gradient at the first AdamW step and the lr at each.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
from typing import Any

import torch
import yaml

from experiments.parity.common import (
    CLASSNAMES,
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

REPO = "gaopengcuhk/Tip-Adapter"
COMMIT = "d0e2d6f8c5feb8b6ce937b757810761f7155d4d5"
VIEW_SEED = 100  # the cache images: batch(5, VIEW_SEED); the noise of their views: VIEW_SEED + 1 + v


def views(count: int) -> list[torch.Tensor]:
    """The cache images' augmented views: `count` pixel batches of the 5 cache images (labels 0 .. 4,
    one shot per class), each the images of seed VIEW_SEED plus seeded noise of +-32 levels."""
    base = batch(len(CLASSNAMES), VIEW_SEED)[0].int()
    noisy = []
    for v in range(count):
        noise = torch.randint(-32, 33, base.shape, generator=torch.Generator().manual_seed(VIEW_SEED + 1 + v))
        noisy.append((base + noise).clamp(0, 255).to(torch.uint8))
    return noisy


def validation() -> tuple[torch.Tensor, torch.Tensor]:
    """The validation images' pixels and labels: the first two views of the cache images (which
    the cache recognises: the search has something to find)."""
    first, second = views(2)
    labels = torch.arange(len(CLASSNAMES))
    return torch.cat([first, second]), torch.cat([labels, labels])


class ViewsLoader:
    """A loader of one batch, another view at each pass (as the official random augmentation)."""

    def __init__(self, images: list[torch.Tensor], labels: torch.Tensor) -> None:
        self.images, self.labels, self.passes = images, labels, 0

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Any:
        images = self.images[self.passes % len(self.images)]
        self.passes += 1
        return iter([(images, self.labels)])


def accuracy_numpy2(output: torch.Tensor, target: torch.Tensor, topk: int = 1) -> float:
    """The official `utils.cls_acc` with `.item()` for the `float()` of a one-element array."""
    pred = output.topk(topk, 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return 100 * correct[:topk].reshape(-1).float().sum().item() / target.shape[0]


def main() -> None:
    args = parse_args(__doc__, REPO, COMMIT)
    put_on_path(args.checkout)
    cpu_fp32()
    utils = importlib.import_module("utils")
    official = importlib.import_module("main")
    template = importlib.import_module("datasets.oxford_pets").template
    cfg = yaml.safe_load((args.checkout / "configs" / "oxford_pets.yaml").read_text())
    cfg["cache_dir"] = tempfile.mkdtemp(prefix="tip-adapter-")

    clip = project_clip()
    fixture = common_fields(clip, REPO, COMMIT)
    fixture["template"] = template[0]
    build_model = use_tiny_weights(clip)
    check_same_clip(build_model(tiny_state(clip)), clip)
    clip_model = importlib.import_module("clip").load(cfg["backbone"], device="cpu")[0].eval()

    seen: list[torch.Tensor] = []  # the logits main.py's accuracy calls see, in order
    searched: list[tuple[float, float]] = []
    search_hp = official.search_hp

    def recording_accuracy(output: torch.Tensor, target: torch.Tensor, topk: int = 1) -> float:
        seen.append(output.detach().clone())
        return accuracy_numpy2(output, target, topk)

    def recording_search(*search_args: Any, **kwargs: Any) -> tuple[float, float]:
        searched.append(best := search_hp(*search_args, **kwargs))
        return best

    utils.cls_acc = accuracy_numpy2  # search_hp's
    official.cls_acc, official.search_hp = recording_accuracy, recording_search

    cache_labels = torch.arange(len(CLASSNAMES))
    view_images = [normalise(p) for p in views(cfg["augment_epoch"])]
    val_pixels, val_labels = validation()
    test = [(normalise(fixture["pixels"]), fixture["labels"])]
    val = [(normalise(val_pixels), val_labels)]
    clip_weights = utils.clip_classifier(fixture["classnames"], template, clip_model)
    cache_loader = ViewsLoader(view_images, cache_labels)
    cache_keys, cache_values = utils.build_cache_model(cfg, clip_model, cache_loader)
    val_features, val_labels = utils.pre_load_features(cfg, "val", clip_model, val)
    test_features, test_labels = utils.pre_load_features(cfg, "test", clip_model, test)
    official.run_tip_adapter(
        cfg, cache_keys, cache_values, val_features, val_labels, test_features, test_labels, clip_weights
    )
    # its accuracies: val zero-shot, val at the initial alpha, beta; test zero-shot, test searched
    assert len(seen) == 4 and len(searched) == 1
    fixture["cache_keys"], fixture["cache_values"] = cache_keys.t().clone(), cache_values.clone()
    fixture["zero_shot_logits"], fixture["logits"] = seen[2], seen[3]
    fixture["searched"] = {"beta": searched[0][0], "alpha": searched[0][1]}
    fixture["views"] = {"count": cfg["augment_epoch"], "seed": VIEW_SEED}

    records: dict[str, Any] = {"lr": []}

    class RecordingAdamW(torch.optim.AdamW):
        """The official AdamW, recording the keys' gradient at its first step and the lr at each."""

        def step(self, *step_args: Any, **kwargs: Any) -> Any:
            if "grads" not in records:
                (keys,) = self.param_groups[0]["params"]
                records["grads"] = {"keys": keys.grad.detach().clone()}
                records["optimizer"] = optimizer_settings(self)
            records["lr"].append([group["lr"] for group in self.param_groups])
            return super().step(*step_args, **kwargs)

    cross_entropy = torch.nn.functional.cross_entropy

    def recording_cross_entropy(logits: torch.Tensor, target: torch.Tensor, *a: Any, **k: Any) -> Any:
        loss = cross_entropy(logits, target, *a, **k)
        records.setdefault("logits", logits.detach().clone())
        records.setdefault("ce", loss.detach().clone())
        return loss

    torch.optim.AdamW, torch.nn.functional.cross_entropy = RecordingAdamW, recording_cross_entropy
    official.run_tip_adapter_F(
        cfg, cache_keys, cache_values, val_features, val_labels, test_features, test_labels,
        clip_weights, clip_model, ViewsLoader([test[0][0]], test[0][1]),
    )  # fmt: skip
    torch.nn.functional.cross_entropy = cross_entropy
    fixture["finetune"] = {
        "logits": records["logits"],
        "loss": {"ce": records["ce"]},
        "grads": records["grads"],
        "optimizer": records["optimizer"],
        "lr": records["lr"],
        "recipe": {"batch_size": 256, "epochs": cfg["train_epoch"], "steps": len(records["lr"])},
    }
    sys.stdout.flush()
    save("tip_adapter", fixture, args.out)


if __name__ == "__main__":
    main()

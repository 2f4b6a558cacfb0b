"""What each method's recipe makes a run do, read from the composed config and the optimiser its
module builds: the snapshot behind tests/test_recipes.py (tests/fixtures/recipes.json, written by
`python -m tests.recipes` from the code before the recipes moved into the method configs). Changed
since, on purpose and only there: ProGrad's Oxford Pets template, now the official code's own
("a type of pet, a photo of a {}.", issue 28)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import OmegaConf

SNAPSHOT = Path(__file__).parent / "fixtures" / "recipes.json"
METHODS = [
    "coop", "cocoop", "kgcoop", "prograd", "maple", "ivlp", "promptsrc", "mmrl", "clip_lora",
    "dept", "dept:kgcoop", "dept:maple", "dept:promptsrc", "tip_adapter", "tip_adapter_f", "tpt",
    "zeroshot", "zeroshot_ensemble", "linear_probe",
]  # fmt: skip
# Settings each method is composed with: the recipe may depend on the shots, the dataset and the
# context group.
SETTINGS = {
    "pets16": ["dataset=oxford_pets", "shots=16"],
    "pets1": ["dataset=oxford_pets", "shots=1"],
    "imagenet4": ["dataset=imagenet", "shots=4", "ctx=class_specific"],
}
# The optimiser's former arguments, which were part of method.module
FORMER_OPTIMISATION = {
    "lr", "momentum", "weight_decay", "warmup_epochs", "warmup_lr", "betas", "eps", "eta_min"
}  # fmt: skip
# Smaller depths so that the deep-prompt methods build on the two blocks of the tiny CLIP
TINY = {
    "maple": ["method.module.prompt_depth=2"],
    "ivlp": ["method.module.prompt_depth_text=2", "method.module.prompt_depth_vision=2"],
    "mmrl": ["method.module.rep_layers=[2]"],
}
TINY["promptsrc"] = TINY["dept:promptsrc"] = TINY["ivlp"]
TINY["dept:maple"] = TINY["maple"]
STEPS_PER_EPOCH = 3


def overrides(method: str) -> list[str]:
    name, _, base = method.partition(":")
    return [f"method={name}", *([f"method.base={base}"] if base else [])]


def config_recipe(cfg: Any) -> dict[str, Any]:
    """The settings a method's recipe decides, from the resolved run config."""
    from src.methods.base import method_arguments, method_class

    data = cfg.data
    cls = method_class(cfg.method)
    module = {
        k: v
        for k, v in method_arguments(cls, cfg.method.module).items()
        if k not in FORMER_OPTIMISATION and k not in ("base",)
    }
    module["_target_"] = cfg.method.module.get("_target_")
    module["base"] = str(cfg.method.module.get("base"))
    test_transform = OmegaConf.select(cfg, "data.test_transform")
    return {
        "data": {
            "batch_size": data.batch_size,
            "test_batch_size": data.test_batch_size,
            "drop_last": OmegaConf.select(cfg, "data.drop_last", default=None),
            "crop_scale": list(data.crop_scale),
            "test_transform": None if test_transform is None else OmegaConf.to_container(test_transform),
        },
        "trainer": {
            "max_epochs": cfg.trainer.max_epochs,
            "max_steps": OmegaConf.select(cfg, "trainer.max_steps", default=-1),
            "check_val_every_n_epoch": cfg.trainer.check_val_every_n_epoch,
        },
        "ctx": OmegaConf.to_container(cfg.ctx, resolve=True),
        "method": {"name": cfg.method.name, "variant": OmegaConf.select(cfg, "method.variant")},
        "module": json.loads(json.dumps(module)),
    }


def optimisation_recipe(module: Any, max_epochs: int, max_steps: int) -> dict[str, Any] | None:
    """The optimiser (class, hyper-parameters per group) and the learning rate at every step of the
    schedule that the method's configure_optimizers builds for a run of this length."""
    steps = max_steps if max_steps > 0 else max_epochs * STEPS_PER_EPOCH
    trainer = SimpleNamespace(
        max_epochs=max_epochs, max_steps=max_steps, estimated_stepping_batches=steps,
        num_training_batches=STEPS_PER_EPOCH, global_step=0, current_epoch=0,
    )  # fmt: skip
    object.__setattr__(module, "_trainer", trainer)
    for child in module.modules():
        object.__setattr__(child, "_trainer", trainer)
    built = module.configure_optimizers()
    if built is None:
        return None
    optimizer = built["optimizer"] if isinstance(built, dict) else built
    kept = ("lr", "momentum", "weight_decay", "betas", "eps", "dampening", "nesterov", "amsgrad")
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k in kept}
        for g in optimizer.param_groups
    ]
    lrs: list[list[float]] = []
    scheduler = built.get("lr_scheduler") if isinstance(built, dict) else None
    if scheduler is not None:
        interval = scheduler.get("interval", "epoch")
        schedule = scheduler["scheduler"]
        for _ in range(steps if interval == "step" else max_epochs):
            lrs.append([g["lr"] for g in optimizer.param_groups])
            optimizer.step()
            schedule.step()
        picked = sorted({0, 1, 2, len(lrs) // 3, len(lrs) // 2, len(lrs) - 2, len(lrs) - 1})
        lrs = [lrs[i] for i in picked if 0 <= i < len(lrs)]
        interval_of = interval
    else:
        interval_of = None
    return {
        "optimizer": type(optimizer).__name__,
        "groups": groups,
        "interval": interval_of,
        "lrs": [[float(f"{x:.10g}") for x in row] for row in lrs],
        "sum": float(f"{sum(math.fsum(r) for r in lrs):.10g}"),
    }


def snapshot(make_cfg: Any, tmp: Path) -> dict[str, Any]:
    """Every method's recipe under every setting."""
    from src.methods.base import build_method

    torch.manual_seed(0)
    from src.models.clip import FrozenCLIP

    clip = FrozenCLIP("coop-tiny", None)
    classnames = ["cat", "dog", "bird"]
    out: dict[str, Any] = {}
    for method in METHODS:
        for setting, extra in SETTINGS.items():
            cfg = make_cfg([*overrides(method), *extra], tmp)
            out[f"{method}/{setting}"] = config_recipe(cfg)
        cfg = make_cfg([*overrides(method), *SETTINGS["pets16"], "model=tiny", *TINY.get(method, [])], tmp)
        module = build_method(cfg.method, clip, classnames)
        out[f"{method}/optimisation"] = optimisation_recipe(
            module, cfg.trainer.max_epochs, OmegaConf.select(cfg, "trainer.max_steps", default=-1)
        )
    return out


if __name__ == "__main__":
    from tests.conftest import make_cfg

    recipes = snapshot(make_cfg, Path("/tmp/recipes"))
    text = json.dumps(recipes, indent=1, sort_keys=True)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(text + "\n")
    else:
        SNAPSHOT.write_text(text + "\n")

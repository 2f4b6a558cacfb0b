"""Makes tests/fixtures/dassl/: checkpoints written by the original repositories' own code, and the
logits their own models give with them, for tests/test_released_prompts.py.

For each of CoOp, CoCoOp (KaiyangZhou/CoOp), KgCoOp (htyao89/KgCoOp) and ProGrad
(BeierZhu/Prompt-align, on the Dassl fork it ships), this script imports the
original trainer module from a checkout, builds its prompted CLIP (`CustomCLIP`, its prompt learner
included) on the tiny random-weight backbone `coop-tiny-openai` (seed 0, put into the original's
own `clip.model.CLIP` class), trains the prompt learner two SGD steps with Dassl's own optimiser
and warm-up cosine schedule (so that the file holds a stepped optimiser and scheduler, as a
released one does), saves it with Dassl's own `save_checkpoint` in the dict of Dassl's
`TrainerBase.save_model`, and writes the logits of the original model on seeded random images.

With checkouts of KaiyangZhou/Dassl.pytorch, KaiyangZhou/CoOp and htyao89/KgCoOp, and Dassl's
imports (yacs, gdown, tensorboard, and wilds without its dependencies) in a folder of their own:

    PYTHONPATH=$PWD .venv/bin/python experiments/parity/dassl_checkpoints.py --dassl <Dassl.pytorch> \
        --coop <CoOp> --kgcoop <KgCoOp>/KgCoOp --prompt-align <Prompt-align> \
        --deps <folder of Dassl's imports>

ProGrad's prompt learner starts as its recipe does (CTX_INIT: 16 vectors, zeros then the words of
its Oxford Pets template "a type of pet, a photo of a {}." before the name; "a" stays text).

Adaptations, none of which touches what the originals compute: their `LRScheduler` subclasses
pass `verbose`, which torch >= 2.7 no longer takes (dropped here); KgCoOp moves its hand-made
teacher to CUDA (`.cuda()` is the identity here, on the CPU) and loads CLIP's weights by URL inside
its prompt learner (it gets the same tiny CLIP instead). Commits used for the stored fixtures:
Dassl.pytorch c61a1b5, CoOp ff61507, KgCoOp c43ccc3, Prompt-align 1b76203 (manifest.json records
them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "dassl"
CLASSNAMES = ["red fox", "golden_retriever"]
IMAGES_SEED, N_IMAGES = 0, 4
BACKBONE, BACKBONE_SEED = "coop-tiny-openai", 0


def images() -> torch.Tensor:
    """The test images: seeded normal noise at the backbone's input size (tests make the same)."""
    return torch.randn(N_IMAGES, 3, 32, 32, generator=torch.Generator().manual_seed(IMAGES_SEED))


def official_clip(clip_model):
    """The tiny backbone in the original's own CLIP class (`clip_model`: its clip/model.py; fp32, as
    with PREC fp32), weights from this project's open_clip model of the same architecture and seed."""
    from src.models.clip import FrozenCLIP

    torch.manual_seed(BACKBONE_SEED)
    ours = FrozenCLIP(BACKBONE, None).model
    model = clip_model.CLIP(
        embed_dim=64,
        image_resolution=32,
        vision_layers=2,
        vision_width=64,
        vision_patch_size=8,
        context_length=77,
        vocab_size=49408,
        transformer_width=64,
        transformer_heads=1,
        transformer_layers=2,
    )
    model.load_state_dict(ours.state_dict())
    return model.float().eval()


def config(trainer: str):
    """Dassl's default config with the fields the original train.py's `extend_cfg` adds."""
    from dassl.config import get_cfg_default
    from yacs.config import CfgNode

    cfg = get_cfg_default()
    cfg.TRAINER.COOP = CfgNode(
        {"N_CTX": 4, "CSC": False, "CTX_INIT": "", "PREC": "fp32", "CLASS_TOKEN_POSITION": "end"}
    )
    cfg.TRAINER.COCOOP = CfgNode({"N_CTX": 4, "CTX_INIT": "a photo of a", "PREC": "fp32"})
    cfg.TRAINER.COOP.W = 8.0
    cfg.INPUT.SIZE = (32, 32)
    cfg.DATASET.NAME = "OxfordPets"
    cfg.OPTIM.NAME, cfg.OPTIM.LR, cfg.OPTIM.MAX_EPOCH = "sgd", 0.002, 2
    cfg.OPTIM.LR_SCHEDULER, cfg.OPTIM.WARMUP_EPOCH = "cosine", 1
    cfg.OPTIM.WARMUP_TYPE, cfg.OPTIM.WARMUP_CONS_LR = "constant", 1e-5
    if trainer == "KgCoOp":
        cfg.TRAINER.COOP.CTX_INIT = True  # its recipe: the context starts from "a photo of a"
    if trainer == "ProGrad":  # its recipe: zeros, then its dataset template's words
        cfg.TRAINER.COOP.CTX_INIT, cfg.TRAINER.COOP.N_CTX = True, 16
    return cfg


def make(method: str, trainer: str, repo: Path, deps: str, dassl: Path) -> dict:
    """Runs in a fresh interpreter per repository (each has its own `clip` and `trainers` packages)."""
    sys.path[:0] = [str(dassl), str(repo), deps]
    import torch.nn as nn
    import torch.optim.lr_scheduler as schedulers

    init = schedulers.LRScheduler.__init__

    def without_verbose(self, optimizer, last_epoch=-1, verbose=False):
        init(self, optimizer, last_epoch)

    schedulers.LRScheduler.__init__ = without_verbose
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self

    import clip.model as clip_model
    from dassl.optim import build_lr_scheduler, build_optimizer
    from dassl.utils import save_checkpoint

    module = __import__(f"trainers.{method}", fromlist=["CustomCLIP"])
    module.load_clip_to_cpu = lambda cfg: official_clip(clip_model)  # KgCoOp's teacher, by URL there
    cfg = config(trainer)
    model = module.CustomCLIP(cfg, CLASSNAMES, official_clip(clip_model))
    for name, param in model.named_parameters():
        param.requires_grad_("prompt_learner" in name if trainer != "KgCoOp" else "ctx" in name)
    learner = model.prompt_learner
    optim = build_optimizer(learner, cfg.OPTIM)
    sched = build_lr_scheduler(optim, cfg.OPTIM)
    torch.manual_seed(1)
    x, labels = images(), torch.tensor([0, 1, 1, 0])
    model.train()
    for _ in range(2):
        out = model(x, labels) if trainer == "CoCoOp" else model(x)
        if trainer == "CoCoOp":  # in training, its forward returns the loss
            loss = out
        elif trainer == "KgCoOp":
            logits, score = out
            loss = nn.functional.cross_entropy(logits, labels) + cfg.TRAINER.COOP.W * score
        else:
            loss = nn.functional.cross_entropy(out, labels)
        optim.zero_grad()
        loss.backward()
        optim.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        logits = model(images())
        logits = logits[0] if isinstance(logits, tuple) else logits
    epoch = 2
    state = {
        "state_dict": learner.state_dict(),
        "epoch": epoch,
        "optimizer": optim.state_dict(),
        "scheduler": sched.state_dict(),
        "val_result": None,
    }  # TrainerBase.save_model's dict
    folder = OUT / method
    save_checkpoint(state, str(folder / "prompt_learner"), model_name=f"model.pth.tar-{epoch}")
    torch.save(logits.clone(), folder / "logits.pt")
    return {"trainer": trainer, "epoch": epoch, "keys": sorted(state["state_dict"])}


def git_commit(path: Path) -> str:
    return subprocess.run(
        ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dassl", type=Path, required=True)
    parser.add_argument("--coop", type=Path, required=True)
    parser.add_argument("--kgcoop", type=Path, required=True, help="the KgCoOp/ folder of htyao89/KgCoOp")
    parser.add_argument("--prompt-align", type=Path, required=True, help="BeierZhu/Prompt-align")
    parser.add_argument("--deps", default="", help="a folder with yacs, gdown, tensorboard and wilds")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # method, trainer: the child's job
    args = parser.parse_args()
    prograd = args.prompt_align / "ProGrad.public", args.prompt_align / "Dassl.ProGrad.pytorch"
    jobs = {  # method: trainer, its repository, its Dassl
        "coop": ("CoOp", args.coop, args.dassl),
        "cocoop": ("CoCoOp", args.coop, args.dassl),
        "kgcoop": ("KgCoOp", args.kgcoop, args.dassl),
        "prograd": ("ProGrad", *prograd),
    }
    if args.one:
        method, trainer = args.one
        print(json.dumps(make(method, trainer, jobs[method][1], args.deps, jobs[method][2])))
        return
    manifest = {
        "backbone": BACKBONE,
        "backbone_seed": BACKBONE_SEED,
        "classnames": CLASSNAMES,
        "images": {"seed": IMAGES_SEED, "n": N_IMAGES, "shape": [3, 32, 32], "draw": "torch.randn"},
        "commits": {
            "KaiyangZhou/Dassl.pytorch": git_commit(args.dassl),
            "KaiyangZhou/CoOp": git_commit(args.coop),
            "htyao89/KgCoOp": git_commit(args.kgcoop),
            "BeierZhu/Prompt-align": git_commit(args.prompt_align),
        },
        "methods": {},
    }
    for method, (trainer, _, _) in jobs.items():
        command = [sys.executable, __file__, *sys.argv[1:], "--one", method, trainer]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"{method}: {done.stderr}")
        manifest["methods"][method] = json.loads(done.stdout.strip().splitlines()[-1])
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"written to {OUT}")


if __name__ == "__main__":
    main()

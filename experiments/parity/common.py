"""What every parity script shares: the checkout of the official code at its named commit, the
project's tiny CLIP as the official code's own CLIP, the fixed batch, and the fixture file.

A parity script runs an official implementation's model, loss and optimiser, unchanged, on the
project's random-weight tiny CLIP (`coop-tiny`, seed 0: the `tiny_clip` of tests/conftest.py) and
a fixed batch, and stores what it computed in tests/fixtures/parity/<method>.pt;
tests/test_parity.py computes the same with the project's method. What the scripts change of the
official run, and nothing else:

- CPU and fp32: `.cuda()` of tensors and modules returns them unchanged, `.half()` casts to fp32
  (`cpu_fp32`; MaPLe's and IVLP's official code casts its image prompts to fp16 even when it runs
  in fp32);
- the weights: the official code loads the tiny CLIP's state dict where it would download
  OpenAI's, through its own `load_clip_to_cpu` or `clip.load` and `build_model`, in fp32: its
  conversion to fp16 does nothing (`use_tiny_weights`);
- the architecture of those weights: OpenAI's `build_model` infers one attention head per 64
  channels and uses QuickGELU, coop-tiny has heads of 32 channels and GELU; the built model is
  given the tiny model's heads and activation (`like_tiny`; `check_same_clip` checks that its
  image and text features then equal open_clip's). Official code that hard-codes ViT-B/16's
  widths (MaPLe) runs on `coop-tiny-b16` (tests/fixtures/parity/coop-tiny-b16.json), which has
  OpenAI's heads and QuickGELU;
- the data: no Dassl data manager; the trainer gets the class names and the batch directly;
- torch: Dassl's schedulers pass `verbose` to torch's, which newer torch dropped (it only printed);
  `torch_compat` lets torch's scheduler take and ignore it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import open_clip
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from src.models.clip import FrozenCLIP  # noqa: E402  (the worktree's src, whatever PYTHONPATH says)

FIXTURES = ROOT / "tests" / "fixtures" / "parity"
DASSL_FIXTURES = ROOT / "tests" / "fixtures" / "dassl"  # checkpoints of the official save routines
# Class names as a dataset gives them (underscores, names of one to three tokens), the Oxford Pets
# template of the official code and the project (conf/dataset/oxford_pets.yaml).
CLASSNAMES = ["abyssinian", "american_bulldog", "great_pyrenees", "yorkshire_terrier", "sphynx"]
TEMPLATE = "a photo of a {}, a type of pet."
DATASET_NAME = "OxfordPets"  # the official Dassl dataset of that template
BATCH = 4
TINY = "coop-tiny"
# ViT-B/16's widths (image 768, text and joint space 512, heads of 64, QuickGELU) in 3 blocks per
# tower, for the official code that hard-codes those widths (MaPLe's Linear(512, 768) couplings)
WIDE = "coop-tiny-b16"
# Packages the official code imports that the project's environment lacks (Dassl's yacs, gdown,
# tensorboard, wilds), installed apart: see README.md in this folder.
EXTRA = Path(os.environ.get("PARITY_EXTRA", "/tmp/parity-extra"))


def parse_args(doc: str, repo: str, commit: str) -> argparse.Namespace:
    """The script's arguments: the official checkout (and Dassl's where it is apart), and whether
    another commit than `commit` may be used."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("checkout", type=Path, help=f"a git checkout of {repo} at {commit[:7]}")
    parser.add_argument("--dassl", type=Path, help="a git checkout of KaiyangZhou/Dassl.pytorch")
    parser.add_argument(
        "--any-commit", action="store_true", help="run another commit than the one the fixture is from"
    )
    parser.add_argument("--out", type=Path, help="the fixture file (default: tests/fixtures/parity/)")
    args = parser.parse_args()
    check_commit(args.checkout, commit, args.any_commit)
    return args


def check_commit(checkout: Path, commit: str, any_commit: bool = False) -> str:
    """The checkout's commit; an error unless it is `commit` (or `any_commit`)."""
    head = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if head != commit and not any_commit:
        sys.exit(
            f"error: {checkout} is at {head[:10]}, the fixture is made at {commit[:10]}: "
            f"`git -C {checkout} checkout {commit[:10]}`, or pass --any-commit"
        )
    return head


def put_on_path(*paths: Path) -> None:
    """The official code's packages (`clip`, `trainers`, `dassl`) first on sys.path, the extra
    packages last (they never shadow the project's)."""
    for path in reversed(paths):
        sys.path.insert(0, str(path))
    os.environ.setdefault("OUTDATED_IGNORE", "1")  # wilds asks the network for its latest version
    if str(EXTRA) not in sys.path:
        sys.path.append(str(EXTRA))


def torch_compat() -> None:
    """torch's LR schedulers take (and ignore) the `verbose` argument Dassl passes them."""
    from torch.optim.lr_scheduler import LRScheduler  # noqa: PLC0415

    init = LRScheduler.__init__
    if "verbose" in init.__code__.co_varnames or getattr(init, "takes_verbose", False):
        return

    def init_taking_verbose(self: Any, optimizer: Any, last_epoch: int = -1, verbose: Any = False) -> None:
        init(self, optimizer, last_epoch)

    init_taking_verbose.takes_verbose = True
    LRScheduler.__init__ = init_taking_verbose


def project_clip(name: str = TINY) -> FrozenCLIP:
    """The tests' `tiny_clip` (coop-tiny; `WIDE`: `tiny_b16_clip`), open_clip's random
    initialisation under seed 0."""
    if name == WIDE:
        open_clip.add_model_config(FIXTURES / f"{WIDE}.json")
    torch.manual_seed(0)
    return FrozenCLIP(name, None)


def weights_digest(clip: FrozenCLIP) -> str:
    """SHA-256 of the CLIP weights' bytes, in state-dict order: the fixture's weights, checked by
    the test before anything is compared (another open_clip or torch may initialise otherwise)."""
    digest = hashlib.sha256()
    for name, tensor in clip.model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def batch(size: int = BATCH, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed batch: uint8 pixels [size, 3, 32, 32] and labels, from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, 3, 32, 32), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, len(CLASSNAMES), (size,), generator=generator)
    return pixels, labels


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels to CLIP's input: [0, 1], then OpenAI's mean and std (tests/test_parity.py does the same)."""
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (pixels.float() / 255 - mean) / std


def use_tiny_weights(
    clip: FrozenCLIP,
    package: str = "clip",
    models: tuple[str, ...] = ("model",),
    builders: tuple[str, ...] = ("build_model",),
    jit_archive: bool = False,
) -> Callable[..., nn.Module]:
    """Makes the official `clip` package load the tiny CLIP's weights wherever it would load
    OpenAI's: its `_download` returns a file of the tiny CLIP's state dict (which `torch.jit.load`
    refuses, so the official code takes its `torch.load` path, as for a state-dict checkpoint); the
    `convert_weights` (to fp16) of its model modules (`models`) does nothing, so the weights load
    unrounded in fp32; its `builders` give the built model the tiny model's heads and activation.
    Returns the first builder. Everything else of the official loading (its `load_clip_to_cpu`,
    `clip.load`, the design details of its prompted encoders) runs as it is. `jit_archive`: for
    official code that can only load OpenAI's TorchScript archives (TPT's `clip.load` reads the
    archive's `state_dict()` whichever way it loads), `torch.jit.load` of that file gives an object
    with the archive's `eval()` and `state_dict()`, the tiny CLIP's."""
    api = importlib.import_module(f"{package}.clip")
    weights = Path(tempfile.mkdtemp(prefix="parity-")) / "tiny-clip.pt"
    torch.save(clip.model.state_dict(), weights)
    api._download = lambda url, *args, **kwargs: str(weights)
    if jit_archive:
        jit_load, state = torch.jit.load, tiny_state(clip)
        archive = SimpleNamespace(state_dict=lambda: dict(state))
        archive.eval = lambda: archive

        def load_archive(file: Any, *args: Any, **kwargs: Any) -> Any:
            return archive if str(file) == str(weights) else jit_load(file, *args, **kwargs)

        torch.jit.load = load_archive
    for name in models:
        importlib.import_module(f"{package}.{name}").convert_weights = lambda model: None

    def like_tiny_builder(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        def build_like_tiny(state_dict: dict, *args: Any, **kwargs: Any) -> nn.Module:
            model = build(state_dict, *args, **kwargs)
            like_tiny(model, clip)
            return model

        return build_like_tiny

    for name in builders:
        setattr(api, name, like_tiny_builder(getattr(api, name)))
    return getattr(api, builders[0])


def like_tiny(model: nn.Module, clip: FrozenCLIP) -> None:
    """The official CLIP given the tiny open_clip model's attention heads and MLP activation (OpenAI's
    `build_model` infers a head per 64 channels and uses QuickGELU), module by module."""
    project = dict(clip.model.named_modules())
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            module.num_heads = project[name].num_heads
            module.head_dim = project[name].head_dim
        mlp = getattr(module, "mlp", None)
        if isinstance(mlp, nn.Sequential) and hasattr(mlp, "gelu"):
            mlp.gelu = project[f"{name}.mlp.gelu"]


def tiny_state(clip: FrozenCLIP) -> dict[str, torch.Tensor]:
    """A copy of the tiny CLIP's state dict, for an official `build_model`."""
    return {name: tensor.clone() for name, tensor in clip.model.state_dict().items()}


def check_same_clip(model: nn.Module, clip: FrozenCLIP) -> None:
    """The official CLIP's plain image and text features (a CLIP built without prompts) equal
    open_clip's on the fixed batch."""
    pixels, _ = batch()
    tokens = clip.tokenize([TEMPLATE.format(name.replace("_", " ")) for name in CLASSNAMES])
    with torch.no_grad():
        images = normalise(pixels)
        pairs = {
            "image": (model.encode_image(images), clip.encode_image(images)),
            "text": (model.encode_text(tokens), clip.encode_text(tokens)),
        }
    for what, (official, project) in pairs.items():
        diff = (official - project).abs().max().item()
        if diff > 1e-5:
            sys.exit(f"error: the official CLIP's {what} features differ from open_clip's by {diff:.2e}")


def cpu_fp32() -> None:
    """From now on, in this process, `.cuda()` of tensors and modules returns them as they are and
    `.half()` casts to fp32 instead of fp16: the official code runs on the CPU in fp32 (its fp16
    casts of prompts and one-hot labels included)."""
    for cls in (torch.Tensor, nn.Module):
        cls.cuda = lambda self, *args, **kwargs: self
        cls.half = lambda self, *args, **kwargs: self.float()


def dassl_trainer(trainer_class: type, cfg: Any, classnames: list[str]) -> Any:
    """An official Dassl trainer with its own `build_model()` run, without Dassl's data manager
    (which reads a dataset folder): `dm.dataset.classnames` are the given ones, the device the CPU."""
    from dassl.engine.trainer import TrainerBase  # noqa: PLC0415  (the official Dassl, on sys.path)

    trainer = trainer_class.__new__(trainer_class)
    TrainerBase.__init__(trainer)
    trainer.cfg = cfg
    trainer.device = torch.device("cpu")
    trainer.dm = SimpleNamespace(dataset=SimpleNamespace(classnames=list(classnames)))
    trainer.check_cfg(cfg)
    trainer.build_model()
    return trainer


def dassl_lrs(trainer: Any, epochs: int) -> list[list[float]]:
    """The learning rate of each of the official optimiser's groups in each epoch, stepping its
    scheduler once per epoch as Dassl does; the scheduler is stepped on a copy of its state (the
    trainer's own is untouched)."""
    import copy  # noqa: PLC0415

    sched = copy.deepcopy(trainer.sched)
    lrs = []
    for _ in range(epochs):
        lrs.append([group["lr"] for group in sched.optimizer.param_groups])
        sched.step()
    return lrs


def optimizer_settings(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimiser's class and the hyper-parameters of its groups (lr aside: the schedule says it)."""
    keys = ("momentum", "weight_decay", "dampening", "nesterov", "betas", "eps", "amsgrad")
    groups = [
        {k: (list(g[k]) if isinstance(g[k], tuple) else g[k]) for k in keys if k in g}
        for g in optimizer.param_groups
    ]
    torch_class = next(c for c in type(optimizer).__mro__ if c.__module__.startswith("torch.optim"))
    return {"type": torch_class.__name__, "groups": groups}


def capture_grads(
    optimizer: torch.optim.Optimizer, named: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Records the gradients of `named` parameters when `optimizer.step()` is called (then steps):
    the official step's gradients, as its own forward_backward made them."""
    grads: dict[str, torch.Tensor] = {}
    step = optimizer.step

    def recording_step(*args: Any, **kwargs: Any) -> Any:
        for name, param in named.items():
            grads[name] = param.grad.detach().clone()
        return step(*args, **kwargs)

    optimizer.step = recording_step
    return grads


# A learned tensor of more numbers than this (MaPLe's Linear(512, 768) couplings) is not stored:
# it starts from `seeded` values (as from a checkpoint), and its gradient is stored as a sketch.
LARGE = 100_000
SKETCH_COLUMNS = 2


def seeded(shape: tuple[int, ...] | torch.Size, seed: int) -> torch.Tensor:
    """Values uniform in +-1/sqrt(fan-in) (PyTorch's Linear range) from `seed`: a large tensor's
    initial value, made alike by the script and the test."""
    generator = torch.Generator().manual_seed(seed)
    bound = shape[-1] ** -0.5
    return (torch.rand(tuple(shape), generator=generator) * 2 - 1) * bound


def sketch(grad: torch.Tensor, seed: int) -> torch.Tensor:
    """A large gradient [out, in] times a random [in, SKETCH_COLUMNS] matrix from `seed`: equal
    sketches of unequal gradients have probability zero."""
    generator = torch.Generator().manual_seed(seed)
    return grad.float() @ torch.randn(grad.shape[-1], SKETCH_COLUMNS, generator=generator)


def seed_large(params: dict[str, torch.Tensor], names: dict[str, str], large: int = LARGE) -> dict[str, int]:
    """Sets each parameter of `params` (official name -> tensor) of more than `large` numbers to
    `seeded` values; returns {project name: seed} (`names` maps official to project names)."""
    seeds = {}
    for i, (name, param) in enumerate(sorted(params.items())):
        if param.numel() > large:
            with torch.no_grad():
                param.copy_(seeded(param.shape, 1000 + i))
            seeds[names[name]] = 1000 + i
    return seeds


def store_grads(grads: dict[str, torch.Tensor], seeds: dict[str, int]) -> dict[str, torch.Tensor]:
    """The gradients as stored: a seeded (large) parameter's as its `sketch`."""
    return {name: sketch(g, seeds[name]) if name in seeds else g for name, g in grads.items()}


def save(name: str, fixture: dict[str, Any], out: Path | None = None) -> Path:
    """Writes the fixture (plain tensors, numbers and strings) and says its size."""
    path = out or FIXTURES / f"{name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(fixture, tmp)
    tmp.replace(path)
    torch.load(path, weights_only=True)  # loadable as the test loads it
    print(f"wrote {path} ({path.stat().st_size / 1024:.1f} kB)")
    return path


def common_fields(clip: FrozenCLIP, repo: str, commit: str) -> dict[str, Any]:
    """What every fixture records of its inputs."""
    pixels, labels = batch()
    return {
        "official": {"repo": repo, "commit": commit},
        "weights_digest": weights_digest(clip),
        "classnames": CLASSNAMES,
        "template": TEMPLATE,
        "pixels": pixels,
        "labels": labels,
    }


def prepare_dassl(*paths: Path) -> None:
    """The official code (its `clip`, `trainers`, `dassl`) on sys.path, Dassl's schedulers on
    today's torch, everything on the CPU in fp32: what every Dassl-based script does first."""
    put_on_path(*paths)
    torch_compat()
    cpu_fp32()


def official_clip(
    repo: str, commit: str, name: str = TINY, design: dict[str, Any] | None = None, **loading: Any
) -> tuple[FrozenCLIP, dict[str, Any]]:
    """The tiny CLIP `name` and the fixture's common fields; the official `clip` package made to load
    its weights (`use_tiny_weights(clip, **loading)`) and checked to compute open_clip's features
    with a CLIP built without prompts (`design`: the official builder's design dict, where it takes
    one)."""
    clip = project_clip(name)
    fixture = common_fields(clip, repo, commit)
    build_model = use_tiny_weights(clip, **loading)
    state = tiny_state(clip)
    check_same_clip(build_model(state) if design is None else build_model(state, design), clip)
    return clip, fixture


def dassl_step(
    trainer: Any,
    cfg: Any,
    learned: dict[str, torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    fixture: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The official trainer's own `forward_backward` on the fixed batch, as a batch that is not its
    epoch's last (so no scheduler step): the summary it returns and the gradients of `learned` its
    optimiser stepped with. The optimiser's settings, its learning rate per epoch and the recipe's
    batch size and epochs go into `fixture`."""
    fixture["optimizer"] = optimizer_settings(trainer.optim)
    fixture["lr"] = dassl_lrs(trainer, cfg.OPTIM.MAX_EPOCH)
    fixture["recipe"] = {"batch_size": cfg.DATALOADER.TRAIN_X.BATCH_SIZE, "epochs": cfg.OPTIM.MAX_EPOCH}
    grads = capture_grads(trainer.optim, learned)
    trainer.batch_idx, trainer.num_batches = 0, 2
    return trainer.forward_backward({"img": images, "label": labels}), grads


def released_check(
    trainer: Any, clip: FrozenCLIP, classnames: list[str], images: torch.Tensor, folder: Path | None = None
) -> dict[str, Any]:
    """The official trainer's model written by Dassl's own `save_model` (the released prompts'
    routine) into `folder` (a Dassl output folder; None: a temporary one), with the official
    model's logits on `images` (`logits.pt` beside it), read back as a released prompt by the
    project (src/methods/released.py) and compared: {"file_bytes", "logits"} (the largest
    difference), printed."""
    from src.common.dassl_checkpoint import read_dassl  # noqa: PLC0415
    from src.methods.base import method_from_prompt  # noqa: PLC0415
    from src.methods.released import prompt_from_dassl  # noqa: PLC0415

    trainer.set_model_mode("eval")
    with torch.no_grad():
        official = trainer.model(images)
    with tempfile.TemporaryDirectory() as tmp:
        out = folder or Path(tmp)
        trainer.save_model(0, str(out))
        torch.save(official.clone(), out / "logits.pt")
        (file,) = out.rglob("model.pth.tar-1")
        state = prompt_from_dassl(read_dassl(out), clip, classnames)
        module = method_from_prompt(state, clip, classnames).eval()
        with torch.no_grad():
            mine = module(images)
        check = {"file_bytes": file.stat().st_size, "logits": float((mine - official).abs().max())}
    print(
        f"released checkpoint ({state['method']}, {check['file_bytes']} bytes): logits {check['logits']:.1e}"
    )
    return check

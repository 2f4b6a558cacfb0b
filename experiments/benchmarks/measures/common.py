"""What the measurements share: the grid's sizes, timing and memory, the methods' configs, and
the bench's state (`BenchBase`)."""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from src.methods.base import method_arguments, method_class
from src.methods.coop import CoOp
from src.models.clip import Architecture, FrozenCLIP
from src.models.text_encoder import TextEncoder
from src.run.config import CONF_DIR, compose_config
from src.run.logs import silence_known_warnings

ROOT = Path(__file__).resolve().parents[3]

# The paper's few-shot grid (REFERENCE.md, conf/experiment/fewshot_grid.yaml): classes and test
# images per dataset; shots 1, 2, 4, 8, 16 with 50, 100, 100, 200, 200 epochs (ImageNet: 50);
# 3 seeds x 4 context variants (unified / class-specific x end / middle) per dataset and shots.
GRID_DATASETS = {
    "imagenet": (1000, 50000),
    "caltech101": (100, 2465),
    "oxford_pets": (37, 3669),
    "stanford_cars": (196, 8041),
    "oxford_flowers": (102, 2463),
    "food101": (101, 30300),
    "fgvc_aircraft": (100, 3333),
    "sun397": (397, 19850),
    "dtd": (47, 1692),
    "eurosat": (10, 8100),
    "ucf101": (101, 3783),
}
GRID_EPOCHS = {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}
GRID_SEEDS = 3
GRID_VARIANTS = [(False, "end"), (False, "middle"), (True, "end"), (True, "middle")]
GRID_CLASS_COUNTS = (10, 100, 400, 1000)  # step times measured here, interpolated in between
GRID_PACK = [v for _ in range(GRID_SEEDS) for v in GRID_VARIANTS]  # one pack per dataset and shots

# Methods `--methods` cannot time step by step (the docstring says why).
NOT_STEP_TRAINED = ("linear_probe", "tip_adapter", "tip_adapter_f", "tpt", "zeroshot", "zeroshot_ensemble")


class PeakMemory:
    """Peak memory above the level at entry: CUDA's allocator statistics on GPU; on CPU the
    resident-set size, sampled by a thread (torch has no CPU allocator statistics)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _rss()
            self.high = self.base
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.high = max(self.high, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.high, _rss()) - self.base


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def saved_bytes(fn, weights: torch.nn.Module) -> int:
    """Bytes of the activations one call of `fn` keeps for its backward pass (each storage once,
    `weights`' own tensors left out): the memory a training step holds at its peak besides the
    weights, counted exactly on any device (the resident-set size on a CPU reuses freed memory and
    undercounts small steps)."""
    frozen = {t.untyped_storage().data_ptr() for t in [*weights.parameters(), *weights.buffers()]}
    storages: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in frozen:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        fn()
    return sum(storages.values())


def measure(fn, device: torch.device, repeats: int, warmup: int = 1) -> tuple[float, int]:
    """Median seconds per call and peak memory (bytes) of one call."""
    for _ in range(warmup):
        fn()
    times = []
    with PeakMemory(device) as memory:
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times), memory.peak


def method_overrides(name: str) -> list[str]:
    """The command line's overrides that choose `name` of `--methods`: `method=<name>`, or for
    `<base>_dept`, DePT on that base."""
    base, _, suffix = name.rpartition("_")
    if suffix == "dept" and base:
        return ["method=dept", f"method.base={base}"]
    return [f"method={name}"]


def method_config(name: str, backbone: str) -> DictConfig:
    """The run config of `name` of `--methods` (its recipe, as the command line composes it; the
    dataset's template is Oxford Pets', the 37 classes of `--classes`' default), checked against
    `backbone` as src.train checks it (`Method.check_config`); ValueError saying why it cannot be
    timed."""
    if name in NOT_STEP_TRAINED:
        raise ValueError("not trained step by step on images; --methods times the gradient-trained methods")
    folders = {"method": Path(CONF_DIR) / "method", "method.base": Path(CONF_DIR) / "method" / "base"}
    for override in method_overrides(name):
        key, _, choice = override.partition("=")
        if not (folders[key] / f"{choice}.yaml").is_file():
            known = sorted(p.stem for p in folders[key].glob("*.yaml") if p.stem not in NOT_STEP_TRAINED)
            raise ValueError(f"no {key}={choice} in {folders[key]}; one of {known}")
    cfg = compose_config("train", [*method_overrides(name), "dataset=oxford_pets"])
    cls = method_class(cfg.method)
    try:
        cls.check_config(method_arguments(cls, cfg.method.module), Architecture.of(backbone))
    except ValueError as err:
        raise ValueError(
            f"{err} (--methods builds each method with its recipe; --methods-backbone "
            "picks a backbone it fits, e.g. ViT-B-16)"
        ) from err
    return cfg


def method_names(args: argparse.Namespace) -> list[str]:
    """`--methods`, CoOp first (every ratio's reference, measured even when not named)."""
    return ["coop", *(name for name in args.methods if name != "coop")]


@contextmanager
def quiet_trainer() -> Iterator[None]:
    """Lightning's device lines and the warnings of a Trainer fitted on a plain loader of random
    tensors (no workers, no validation) left out of the benchmark's output."""
    logger = logging.getLogger("pytorch_lightning")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            silence_known_warnings()
            warnings.filterwarnings("ignore", message=r".*does not have many workers")
            warnings.filterwarnings("ignore", message=r"You defined a `validation_step` but have no")
            yield
    finally:
        logger.setLevel(level)


class StepTimer(pl.Callback):
    """Seconds of each training step of a Trainer: forward, backward and the optimiser's step
    (Lightning runs them all between the batch's start and end hooks)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, *_: Any) -> None:
        self._sync()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *_: Any) -> None:
        self._sync()
        self.times.append(time.perf_counter() - self.start)


class BenchBase:
    """What every family of measurements shares: the arguments, the device, one CLIP per backbone
    on it, the rows of the table and the figures of the JSON line."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.clips: dict[str, FrozenCLIP] = {}
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
        self.autocast = torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext()
        self.rows: list[tuple[str, float, int]] = []
        self.figures: dict[str, float | int | str | bool] = {}
        self.last_step = None  # the step function measured last (its memory is counted apart)
        self.method_runs: dict[str, str] = {}  # --methods: each name's run name (dept: coop_dept)

    def clip(self, backbone: str) -> FrozenCLIP:
        if backbone not in self.clips:
            torch.manual_seed(0)
            self.clips[backbone] = FrozenCLIP(backbone, None).to(self.device)
        return self.clips[backbone]

    def images(self, clip: FrozenCLIP) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        size = clip.image_size
        return torch.randn(self.args.batch, 3, size, size, generator=generator).to(self.device)

    def coop(self, clip: FrozenCLIP, names: list[str], path: str, class_specific: bool, **kw) -> CoOp:
        clip.text = TextEncoder(clip.model, path=path)
        torch.manual_seed(0)
        return CoOp(clip, names, class_specific=class_specific, **kw).to(self.device)

    def record(self, key: str, label: str, seconds: float, peak: int) -> None:
        self.rows.append((label, seconds, peak))
        self.figures[f"{key}_s"] = seconds
        if peak:
            self.figures[f"{key}_peak_mb"] = peak / 2**20

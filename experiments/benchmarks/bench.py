"""CoOp's cost: the reference computation against this project's exact fast paths.

    make bench                       # ViT-B/32 (random weights), 224 px, batch 32, CPU fp32
    experiments/benchmarks/gpu_check.sh   # GPU: every figure and target of the GPU table

Measures, in one process and on the same inputs:
  - the training step (forward + backward + SGD step) in (a) reference mode
    (model.text_path=reference: 77-position prompts, image encoder every step), (b) the default
    mode (model.text_path=auto: grouped on CPU, batched on a GPU), (c) the default mode on cached
    image features; for the main backbone and for each `--extra-step BACKBONE:CLASSES`;
  - the text side alone (prompt learner + text encoder, forward + backward, cross-entropy
    against `batch` image features) for `--text-classes` ImageNet classes, unified and
    class-specific, for every text path (reference, grouped, batched); "default" is the path
    model.text_path=auto takes on this device;
  - data loading: JPEG decoding and train augmentation per image;
  - with `--e2e`: whole `src.train` runs (the quick start, and a 1000-class 2-shot run on
    generated images), their training wall time against steps x the step time measured here
    (`e2e_overhead_*`);
  - with `--grid`: the paper's few-shot grid in GPU hours, from step times measured at several
    class counts and each dataset's real sizes, reference mode against default, and packed
    (`pack=true`: the 3 seeds x 4 context variants of a dataset and shot count as one pack);
  - with `--pack R`: R runs (seeds of the default context) trained as one pack (src/packing.py)
    against one run alone, at `--pack-classes` classes, on images and on cached features: the step
    time per run and the peak memory of the pack (`pack{R}_{images,cached}_{classes}_*`);
    `--pack-only` measures nothing else (with `--grid`: the grid too);
  - with `--pack-memory C`: the activations a step of each of the grid's 4 context variants keeps
    for backward at C classes (`--grid-backbone`, fp32, forward only), and a pack of the grid's 12
    runs (3 seeds x 4 variants) from them: a pack's grow linearly in its runs (`--pack`'s ratio);
  - with `--methods NAMES`: each gradient-trained method's training cost per image against CoOp's
    (`method_<name>_ms_per_image`, `method_<name>_vs_coop`): the method built as a run builds it
    (its `method=` config composed as the command line composes it, `build_method`) on
    `--methods-backbone` with random weights and `--classes` classes, trained by a Lightning Trainer
    on random images in batches of `--methods-batch` (every method on images, as the published
    figures: the original code encodes the images in every step), `--warmup` + `--repeats` steps,
    the median of the timed ones; DePT on another base as `<base>_dept` (maple_dept, ...). Not
    here: the methods not trained step by step on images (linear_probe, tip_adapter,
    tip_adapter_f: cached features of the data module; tpt: tuned at test time; zeroshot,
    zeroshot_ensemble: no training). `--methods-only` measures nothing else.
Prints a table, then one JSON line with the figures, the ratios and the targets of the device.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import open_clip  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from src.config import CONF_DIR, compose_config  # noqa: E402
from src.methods.base import build_method, method_arguments, method_class  # noqa: E402
from src.methods.coop import CoOp  # noqa: E402
from src.models.clip import Architecture, FrozenCLIP, register_project_configs  # noqa: E402
from src.models.text_encoder import TextEncoder  # noqa: E402
from src.packing import packed_losses, stack_key  # noqa: E402
from src.quiet import silence_known_warnings  # noqa: E402

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

# (figure, comparison, threshold) per device kind; {t} is --text-classes, {x} each extra step's tag
CPU_TARGETS = [
    ("pack{r}_cached_37_speedup", ">=", 2.0),
    ("step_speedup", ">=", 2.0),
    ("cached_step_speedup", ">=", 8.0),
    ("text{t}_unified_speedup", ">=", 10.0),
    ("text{t}_csc_speedup", ">=", 3.0),
    ("text{t}_csc_peak_mem_ratio", "<=", 0.33),
]
GPU_TARGETS = [
    ("text{t}_unified_speedup", ">=", 5.0),
    ("text{t}_csc_speedup", ">=", 3.0),
    ("step_speedup", ">=", 3.0),
    ("cached_step_speedup", ">=", 5.0),
    ("step_{x}_speedup", ">=", 1.3),
    ("cached_step_{x}_speedup", ">=", 3.0),
    ("step_peak_mem_ratio", "<=", 0.25),
    ("e2e_overhead_quickstart", "<=", 1.5),
    ("e2e_overhead_1000", "<=", 1.2),
    ("grid_speedup", ">=", 4.0),
    ("pack{r}_cached_37_speedup", ">=", 5.0),
    ("grid_gpu_hours_packed", "<=", 2.0),
]


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="ViT-B-32", help="open_clip architecture (random weights)")
    parser.add_argument("--classes", type=int, default=37, help="classes for the training step")
    parser.add_argument("--text-classes", type=int, default=None, help="classes for the text side (250)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per figure (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before them")
    parser.add_argument(
        "--extra-step",
        action="append",
        default=[],
        metavar="BACKBONE:CLASSES",
        help="also the training step of this backbone and class count (e.g. RN50-quickgelu:37)",
    )
    parser.add_argument(
        "--skip-reference-text", action="store_true", help="skip the slow reference text runs"
    )
    parser.add_argument("--e2e", action="store_true", help="whole src.train runs: e2e_overhead_*")
    parser.add_argument("--e2e-model", default=None, help="model= of the e2e runs (vit_b16; CPU: tiny)")
    parser.add_argument("--e2e-epochs", type=int, default=None, help="quick start epochs (its own: 200)")
    parser.add_argument("--e2e-classes", type=int, default=1000, help="classes of the large e2e run")
    parser.add_argument("--e2e-large-epochs", type=int, default=10, help="epochs of the large e2e run")
    parser.add_argument("--grid", action="store_true", help="estimate the few-shot grid's GPU hours")
    parser.add_argument("--grid-backbone", default="RN50-quickgelu", help="the grid's backbone")
    parser.add_argument(
        "--grid-class-counts",
        default=",".join(map(str, GRID_CLASS_COUNTS)),
        help="class counts whose step times are measured for the grid",
    )
    parser.add_argument("--pack", type=int, default=0, metavar="R", help="also R runs trained as one pack")
    parser.add_argument("--pack-classes", default="37,1000", help="class counts of the pack measurement")
    parser.add_argument("--pack-only", action="store_true", help="only the pack (and --grid) measurements")
    parser.add_argument(
        "--pack-memory",
        type=int,
        default=0,
        metavar="C",
        help="memory of a pack of the grid's 12 runs at C classes",
    )
    parser.add_argument(
        "--methods",
        default="",
        metavar="NAMES",
        help="each method's training cost per image against CoOp's (comma list of method= names)",
    )
    parser.add_argument("--methods-backbone", default="ViT-B-16", help="their backbone (random weights)")
    parser.add_argument("--methods-batch", type=int, default=4, help="the methods' common batch")
    parser.add_argument("--methods-only", action="store_true", help="only --methods (and --pack, --grid)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON line to this file")
    args = parser.parse_args(argv)
    if args.text_classes is None:
        args.text_classes = 250 if args.device == "cpu" else 1000
    for spec in args.extra_step:
        name, _, classes = spec.rpartition(":")
        if not name or not classes.isdigit():
            parser.error(f"--extra-step {spec!r}: give BACKBONE:CLASSES, e.g. RN50-quickgelu:37")
    args.grid_class_counts = [int(c) for c in str(args.grid_class_counts).split(",")]
    args.pack_classes = [int(c) for c in str(args.pack_classes).split(",")]
    if args.pack_only and not (args.pack or args.pack_memory):
        parser.error("--pack-only: give the pack's size with --pack R (or --pack-memory C)")
    args.methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    if args.methods_only and not args.methods:
        parser.error("--methods-only: name the methods with --methods NAMES (e.g. coop,cocoop)")
    # every method's config composed and checked against the backbone before anything is measured
    args.method_configs = {}
    if args.methods:
        register_project_configs()  # the tiny architectures of src/models/configs too
        if args.methods_backbone not in open_clip.list_models():
            parser.error(
                f"--methods-backbone {args.methods_backbone}: not an open_clip architecture (ViT-B-16)"
            )
    for name in method_names(args) if args.methods else []:
        try:
            args.method_configs[name] = method_config(name, args.methods_backbone)
        except ValueError as err:
            parser.error(f"--methods {name}: {err}")
    return args


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


class Bench:
    """The measurements, sharing one CLIP per backbone on the device."""

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

    def step_time(
        self,
        backbone: str,
        names: list[str],
        path: str,
        cached: bool,
        class_specific: bool = False,
        position: str = "end",
    ) -> tuple[float, int]:
        """Seconds and peak memory of one training step (on the fly or on cached image features)."""
        clip = self.clip(backbone)
        images = self.images(clip)
        labels = torch.arange(self.args.batch, device=self.device) % len(names)
        module = self.coop(clip, names, path, class_specific, class_token_position=position)
        features = None
        if cached:
            with torch.no_grad(), self.autocast:
                features = clip.encode_image(images)
        optimizer = torch.optim.SGD(module.prompt_learner.parameters(), lr=0.002, momentum=0.9)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with self.autocast:
                if features is None:
                    logits = module(images)
                else:
                    logits = module.logits(features, module.text_features())
                loss = F.cross_entropy(logits.float(), labels)
            loss.backward()
            optimizer.step()

        self.last_step = step
        return measure(step, self.device, self.args.repeats, self.args.warmup)

    def packed_step_time(
        self, backbone: str, names: list[str], cached: bool, variants: list[tuple[bool, str]]
    ) -> tuple[float, int]:
        """Seconds and peak memory of one step of a pack of runs (src/packing.py's step), a run per
        (class_specific, position) of `variants`, each with its own context, images and optimiser."""
        clip = self.clip(backbone)
        clip.text = TextEncoder(clip.model, path="auto")
        size, batch = clip.image_size, self.args.batch
        generator = torch.Generator().manual_seed(1)
        modules, batches, optimizers = [], [], []
        for seed, (class_specific, position) in enumerate(variants):
            torch.manual_seed(seed)
            module = CoOp(clip, names, class_specific=class_specific, class_token_position=position)
            modules.append(module.to(self.device))
            images = torch.randn(batch, 3, size, size, generator=generator).to(self.device)
            if cached:
                with torch.no_grad(), self.autocast:
                    images = clip.encode_image(images)
            labels = torch.randint(len(names), (batch,), generator=generator).to(self.device)
            batches.append((images, labels))
            optimizers.append(torch.optim.SGD(module.prompt_learner.parameters(), lr=0.002, momentum=0.9))
        keys = [stack_key(module) for module in modules]

        def step() -> None:
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            with self.autocast:
                losses = packed_losses(clip, modules, keys, batches)
            torch.stack(losses).sum().backward()
            for optimizer in optimizers:
                optimizer.step()

        self.last_step = step
        return measure(step, self.device, self.args.repeats, self.args.warmup)

    def pack(self) -> None:
        """R runs as one pack against one alone: step time per run and peak memory."""
        args, runs = self.args, self.args.pack
        for classes in args.pack_classes:
            names = open_clip.IMAGENET_CLASSNAMES[:classes]
            for kind, cached in (("images", False), ("cached", True)):
                tag = f"pack{runs}_{kind}_{classes}"
                alone_s, alone_peak = self.step_time(args.backbone, names, "auto", cached)
                alone_saved = saved_bytes(self.last_step, self.clip(args.backbone))
                seeds = [(False, "end")] * runs
                packed_s, packed_peak = self.packed_step_time(args.backbone, names, cached, seeds)
                packed_saved = saved_bytes(self.last_step, self.clip(args.backbone))
                label = f"{kind} {classes} classes:"
                self.record(f"{tag}_alone", f"{label} one run alone", alone_s, alone_peak)
                self.record(f"{tag}_packed", f"{label} {runs} runs packed", packed_s, packed_peak)
                self.figures[f"{tag}_speedup"] = alone_s / (packed_s / runs)  # per-run step time
                self.figures[f"{tag}_saved_mb_alone"] = alone_saved / 2**20
                self.figures[f"{tag}_saved_mb_packed"] = packed_saved / 2**20
                # what the step keeps for backward, packed / alone: at most R when it grows linearly
                self.figures[f"{tag}_saved_ratio"] = packed_saved / max(alone_saved, 1)
                if self.device.type == "cuda":  # the allocator's peak; a CPU's resident set undercounts
                    self.figures[f"{tag}_peak_mem_ratio"] = packed_peak / alone_peak

    def pack_memory(self) -> None:
        """Activations one step of each grid variant keeps for backward (forward only: the pack of
        12 would hold them all at once), and the grid's pack of 12 from them."""
        args = self.args
        clip = self.clip(args.grid_backbone)
        clip.text = TextEncoder(clip.model, path="auto")
        names = open_clip.IMAGENET_CLASSNAMES[: args.pack_memory]
        width = clip.model.text_projection.shape[1]
        total = 0.0
        for class_specific, position in GRID_VARIANTS:
            torch.manual_seed(0)
            module = CoOp(clip, names, class_specific=class_specific, class_token_position=position)
            batch = [(torch.randn(args.batch, width), torch.arange(args.batch) % len(names))]

            def forward(module: CoOp = module, batch: list = batch) -> None:
                packed_losses(clip, [module], [stack_key(module)], batch)

            megabytes = saved_bytes(forward, clip) / 2**20
            name = f"pack_memory_{'csc' if class_specific else 'unified'}_{position}_{args.pack_memory}_mb"
            self.figures[name] = megabytes
            self.rows.append((f"{name} (activations, fp32)", 0.0, int(megabytes * 2**20)))
            total += megabytes
        self.figures[f"pack_memory_grid{len(GRID_PACK)}_{args.pack_memory}_mb"] = GRID_SEEDS * total

    def methods(self) -> None:
        """Each method's training cost per image (ms) and its ratio to CoOp's, CoOp measured first."""
        args = self.args
        names = method_names(args)
        with quiet_trainer():
            for name in names:
                seconds = self.method_step_time(name)
                self.figures[f"method_{name}_step_s"] = seconds
                self.figures[f"method_{name}_ms_per_image"] = 1000 * seconds / args.methods_batch
        coop = self.figures["method_coop_ms_per_image"]
        for name in names:
            self.figures[f"method_{name}_vs_coop"] = self.figures[f"method_{name}_ms_per_image"] / coop
        self.figures.update(
            methods_backbone=args.methods_backbone,
            methods_batch=args.methods_batch,
            methods_steps=args.repeats,
        )

    def method_step_time(self, name: str) -> float:
        """Median seconds of a training step of `name` (`--methods`), built as src.train builds it and
        trained by a Lightning Trainer, after `--warmup` untimed steps."""
        args = self.args
        cfg = args.method_configs[name]
        clip = self.clip(args.methods_backbone)
        clip.text = TextEncoder(clip.model, path="auto")  # the run's default (other figures change it)
        classnames = open_clip.IMAGENET_CLASSNAMES[: args.classes]
        torch.manual_seed(0)
        module = build_method(cfg.method, clip, classnames)
        steps = args.warmup + args.repeats
        generator = torch.Generator().manual_seed(0)
        size = clip.image_size
        images = torch.randn(steps * args.methods_batch, 3, size, size, generator=generator)
        labels = torch.arange(len(images)) % len(classnames)
        loader = DataLoader(TensorDataset(images, labels), batch_size=args.methods_batch)
        timer = StepTimer(self.device)
        on_gpu = self.device.type == "cuda"
        trainer = pl.Trainer(
            max_epochs=1,
            limit_train_batches=steps,
            accelerator="gpu" if on_gpu else "cpu",
            devices=[self.device.index or 0] if on_gpu else 1,
            precision={"bf16": "bf16-mixed", "fp16": "16-mixed"}.get(args.precision, "32-true"),
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[timer],
        )
        trainer.fit(module, train_dataloaders=loader)
        self.method_runs[name] = cfg.method.name
        return statistics.median(timer.times[args.warmup :])

    def steps(self, backbone: str, classes: int, tag: str = "") -> None:
        names = open_clip.IMAGENET_CLASSNAMES[:classes]
        suffix = f"_{tag}" if tag else ""
        for mode, path, cached in (
            ("step_reference", "reference", False),
            ("step_default", "auto", False),
            ("step_cached", "auto", True),
        ):
            seconds, peak = self.step_time(backbone, names, path, cached)
            label = f"{mode} ({backbone}, {classes} classes, batch {self.args.batch})"
            self.record(f"{mode}{suffix}", label, seconds, peak)
        figures = self.figures
        reference = figures[f"step_reference{suffix}_s"]
        figures[f"step{suffix}_speedup"] = reference / figures[f"step_default{suffix}_s"]
        figures[f"cached_step{suffix}_speedup"] = reference / figures[f"step_cached{suffix}_s"]
        if f"step_reference{suffix}_peak_mb" in figures and f"step_default{suffix}_peak_mb" in figures:
            figures[f"step{suffix}_peak_mem_ratio"] = (
                figures[f"step_default{suffix}_peak_mb"] / figures[f"step_reference{suffix}_peak_mb"]
            )

    def text_side(self) -> None:
        args, t = self.args, self.args.text_classes
        clip = self.clip(args.backbone)
        names = open_clip.IMAGENET_CLASSNAMES[:t]
        labels = torch.arange(args.batch, device=self.device) % len(names)
        with torch.no_grad(), self.autocast:
            cached = clip.encode_image(self.images(clip))
        default = TextEncoder(clip.model).resolved_path(self.device)
        self.figures["text_default_path"] = default
        for kind, class_specific in (("unified", False), ("csc", True)):
            for path in ("reference", "grouped", "batched"):
                if path == "reference" and args.skip_reference_text:
                    continue
                module = self.coop(clip, names, path, class_specific)

                def text_step(module: CoOp = module) -> None:
                    module.prompt_learner.ctx.grad = None
                    with self.autocast:
                        logits = module.logits(cached, module.text_features())
                        loss = F.cross_entropy(logits.float(), labels)
                    loss.backward()

                # the reference takes 40 s on 2 CPU cores: one call there
                slow = path == "reference" and self.device.type == "cpu"
                seconds, peak = measure(text_step, self.device, 1 if slow else args.repeats, args.warmup)
                self.record(f"text{t}_{kind}_{path}", f"text {t} {kind} {path}", seconds, peak)
                if path == default:
                    self.figures[f"text{t}_{kind}_default_s"] = seconds
                    self.figures[f"text{t}_{kind}_default_peak_mb"] = peak / 2**20
                del module
        if not args.skip_reference_text:
            figures = self.figures
            for kind in ("unified", "csc"):
                reference = figures[f"text{t}_{kind}_reference_s"]
                figures[f"text{t}_{kind}_speedup"] = reference / figures[f"text{t}_{kind}_default_s"]
                for path in ("grouped", "batched"):
                    speedup = reference / figures[f"text{t}_{kind}_{path}_s"]
                    figures[f"text{t}_{kind}_{path}_speedup"] = speedup
            figures[f"text{t}_csc_peak_mem_ratio"] = (
                figures[f"text{t}_csc_default_peak_mb"] / figures[f"text{t}_csc_reference_peak_mb"]
            )

    def exactness(self, classes: int = 50) -> None:
        """Largest difference of the fp32 logits and context gradient (relative to its largest
        entry) of each fast path from the reference, on this device (tests/test_exactness.py
        checks 1e-5 on the CPU)."""
        clip = self.clip(self.args.backbone)
        names = open_clip.IMAGENET_CLASSNAMES[:classes]
        with torch.no_grad():
            features = clip.encode_image(self.images(clip)).float()
        labels = torch.arange(self.args.batch, device=self.device) % classes
        for kind, class_specific in (("unified", False), ("csc", True)):
            results = {}
            for path in ("reference", "grouped", "batched"):
                module = self.coop(clip, names, path, class_specific)
                logits = module.logits(features, module.text_features())
                F.cross_entropy(logits, labels).backward()
                results[path] = (logits.detach(), module.prompt_learner.ctx.grad)
            logits, grad = results.pop("reference")
            for path, (other_logits, other_grad) in results.items():
                scale = max(1.0, grad.abs().max().item())
                self.figures.update(
                    {
                        f"exact_{kind}_{path}_logits_max_abs": (other_logits - logits).abs().max().item(),
                        f"exact_{kind}_{path}_grad_max_rel": (other_grad - grad).abs().max().item() / scale,
                    }
                )

    def e2e(self) -> None:
        """Whole src.train runs: their training wall time (`train_time_s`, the fit) against the
        steps they made x the step time measured here for the same backbone and classes."""
        args = self.args
        on_cpu = self.device.type == "cpu"
        model = args.e2e_model or ("tiny" if on_cpu else "vit_b16")
        precision = {"bf16": "bf16-mixed", "fp16": "16-mixed"}.get(args.precision, "32-true")
        common = [
            f"model={model}",
            "model.pretrained=null",
            f"trainer={'cpu' if on_cpu else 'gpu'}",
            f"trainer.precision={precision}",
            "trainer.enable_progress_bar=false",
        ]
        quickstart = ["experiment=quickstart", *common]
        if args.e2e_epochs:
            quickstart.append(f"trainer.max_epochs={args.e2e_epochs}")
        with tempfile.TemporaryDirectory() as tmp:
            self._e2e_run("quickstart", quickstart, Path(tmp) / "quickstart")
            root = generated_folder_dataset(Path(tmp) / "data", args.e2e_classes)
            large = [
                "dataset=folder",
                f"dataset.root={root}",
                "dataset.name=generated",
                "shots=2",
                f"trainer.max_epochs={args.e2e_large_epochs}",
                *common,
            ]
            self._e2e_run(str(args.e2e_classes), large, Path(tmp) / "large")

    def _e2e_run(self, tag: str, overrides: list[str], out: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        env.pop("MALLOC_MMAP_THRESHOLD_", None)  # the runs allocate as a user's would
        command = [
            sys.executable,
            "-m",
            "src.train",
            *overrides,
            f"hydra.run.dir={out}",
            f"paths.cache_dir={out.parent / 'cache'}",
        ]
        start = time.perf_counter()
        run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if run.returncode != 0:
            output = (run.stdout + run.stderr)[-4000:]
            raise RuntimeError(f"e2e run {tag} failed ({' '.join(command)}):\n{output}")
        results = json.loads((out / "results.json").read_text())
        steps = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
        prompt = torch.load(out / "prompt.pt", weights_only=True)
        step_s, _ = self.step_time(prompt["backbone"], prompt["classnames"], "auto", cached=False)
        train_s = results["train_time_s"]
        self.rows.append((f"e2e {tag}: fit of {steps} steps ({results['num_classes']} classes)", train_s, 0))
        self.figures.update(
            {
                f"e2e_{tag}_train_s": train_s,
                f"e2e_{tag}_process_s": wall,
                f"e2e_{tag}_steps": steps,
                f"e2e_{tag}_step_s": step_s,
                f"e2e_overhead_{tag}": train_s / (steps * step_s),
            }
        )

    def grid(self) -> None:
        """GPU hours of the few-shot grid's CoOp runs, reference mode against default."""
        args = self.args
        counts = args.grid_class_counts
        step_times: dict[tuple[str, bool, str], list[float]] = {}
        for mode, path in (("reference", "reference"), ("default", "auto")):
            for class_specific, position in GRID_VARIANTS:
                key = (mode, class_specific, position)
                step_times[key] = []
                for classes in counts:
                    names = open_clip.IMAGENET_CLASSNAMES[:classes]
                    seconds, _ = self.step_time(
                        args.grid_backbone, names, path, False, class_specific, position
                    )
                    step_times[key].append(seconds)
        step_times[("packed",)] = []
        for classes in counts:
            names = open_clip.IMAGENET_CLASSNAMES[:classes]
            seconds, peak = self.packed_step_time(args.grid_backbone, names, False, GRID_PACK)
            step_times[("packed",)].append(seconds)
            self.figures[f"grid_pack{len(GRID_PACK)}_{classes}_peak_mb"] = peak / 2**20
        clip = self.clip(args.grid_backbone)
        test_batch = torch.randn(100, 3, clip.image_size, clip.image_size, device=self.device)

        def encode() -> None:
            with torch.no_grad(), self.autocast:
                clip.encode_image(test_batch)

        encode_s, _ = measure(encode, self.device, args.repeats, args.warmup)
        hours = grid_hours(step_times, counts, encode_s / 100, batch=args.batch)
        self.figures.update(
            {
                "grid_backbone": args.grid_backbone,
                "grid_gpu_hours_reference": hours["reference"],
                "grid_gpu_hours_default": hours["default"],
                "grid_speedup": hours["reference"] / hours["default"],
                "grid_gpu_hours_packed": hours["packed"],
                "grid_pack_speedup": hours["default"] / hours["packed"],
                "grid_test_encode_per_image_s": encode_s / 100,
            }
        )
        for key, times in step_times.items():
            if key == ("packed",):
                name = f"packed{len(GRID_PACK)}"
            else:
                mode, class_specific, position = key
                name = f"{mode}_{'csc' if class_specific else 'unified'}_{position}"
            for classes, seconds in zip(counts, times, strict=True):
                self.figures[f"grid_step_{name}_{classes}_s"] = seconds


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


def interpolate(counts: list[int], times: list[float], classes: int) -> float:
    """Step time at `classes`, piecewise linear between measured class counts; below them the
    smallest count's, above them the last segment's slope (never decreasing)."""
    pairs = sorted(zip(counts, times, strict=True))
    if classes <= pairs[0][0]:
        return pairs[0][1]
    for (c0, t0), (c1, t1) in zip(pairs, pairs[1:], strict=False):
        if classes <= c1:
            return t0 + (t1 - t0) * (classes - c0) / (c1 - c0)
    (c0, t0), (c1, t1) = pairs[-2:] if len(pairs) > 1 else (pairs[0], pairs[0])
    slope = max(0.0, (t1 - t0) / (c1 - c0)) if c1 != c0 else 0.0
    return t1 + slope * (classes - c1)


def grid_hours(
    step_times: dict[tuple, list[float]],
    counts: list[int],
    encode_per_image_s: float,
    batch: int = 32,
) -> dict[str, float]:
    """GPU hours of the grid's CoOp runs per mode: steps x step time per run, plus the test set's
    image encoding, once per run in reference mode (as the original code does), once per dataset in
    the default mode (the feature cache). Every dataset has at least 16 train images per class, so a
    k-shot train set is k x classes images; steps per epoch floor(n / batch), at least 1 (drop_last
    only with a full batch). With `("packed",)` step times (a pack of the seeds x variants of a
    dataset and shot count, one step for all of them), the packed mode too."""
    hours = {}
    modes = ["reference", "default"] + (["packed"] if ("packed",) in step_times else [])
    for mode in modes:
        total = 0.0
        for dataset, (classes, test_images) in GRID_DATASETS.items():
            test_s = test_images * encode_per_image_s
            for shots, epochs in GRID_EPOCHS.items():
                epochs = 50 if dataset == "imagenet" else epochs
                steps = epochs * max(1, shots * classes // batch)
                if mode == "packed":
                    total += steps * interpolate(counts, step_times[("packed",)], classes)
                    continue
                for variant in GRID_VARIANTS:
                    step_s = interpolate(counts, step_times[(mode, *variant)], classes)
                    total += GRID_SEEDS * (steps * step_s + (test_s if mode == "reference" else 0.0))
            if mode != "reference":
                total += test_s
        hours[mode] = total / 3600
    return hours


def generated_folder_dataset(root: Path, classes: int) -> Path:
    """train/ (2 small JPEGs per class), val/ and test/ (1 each) folders, the classes named as
    ImageNet's."""
    import numpy as np
    from PIL import Image

    names = []
    for name in open_clip.IMAGENET_CLASSNAMES[:classes]:
        name = name.replace("/", " ")
        names.append(name if name not in names else f"{name} {len(names)}")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 2), ("val", 1), ("test", 1)):
        for name in names:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.jpg", quality=90)
    return root


def targets(
    figures: dict, device: torch.device, text_classes: int, extra_tags: list[str], pack: int = 6
) -> dict:
    table = GPU_TARGETS if device.type == "cuda" else CPU_TARGETS
    out = {}
    for name, comparison, threshold in table:
        for key in {name.format(t=text_classes, x=tag, r=pack or 6) for tag in extra_tags or [""]}:
            if "{x}" in name and not extra_tags:
                continue
            value = figures.get(key)
            if value is None:
                met = None
            else:
                met = value >= threshold if comparison == ">=" else value <= threshold
            shown = None if value is None else round(value, 3)
            out[key] = {"value": shown, "target": f"{comparison} {threshold}", "met": met}
    return out


def data_loading_cost(size: int, n: int = 64) -> tuple[float, float]:
    """Seconds per image to decode the textile JPEGs, and to augment them (train transform)."""
    import conformal_clip_data
    from PIL import Image

    from src.data.transforms import train_transform

    paths = sorted(Path(conformal_clip_data.nominal_dir()).glob("*.jpg"))[:n]
    start = time.perf_counter()
    decoded = []
    for path in paths:
        with Image.open(path) as image:
            decoded.append(image.convert("RGB"))
    decode = (time.perf_counter() - start) / len(paths)
    transform = train_transform(size)
    start = time.perf_counter()
    for image in decoded:
        transform(image)
    return decode, (time.perf_counter() - start) / len(paths)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    bench = Bench(args)
    device = bench.device
    extra_tags = []
    if not (args.pack_only or args.methods_only):
        bench.steps(args.backbone, args.classes)
        for spec in args.extra_step:
            backbone, _, classes = spec.rpartition(":")
            tag = f"{backbone}_{classes}"
            extra_tags.append(tag)
            bench.steps(backbone, int(classes), tag)
        bench.text_side()
        bench.exactness()
        decode, augment = data_loading_cost(bench.clip(args.backbone).image_size)
        bench.rows.append(("JPEG decode per image", decode, 0))
        bench.rows.append(("train augmentation per image", augment, 0))
        bench.figures.update({"decode_per_image_s": decode, "augment_per_image_s": augment})
    if args.pack:
        bench.pack()
    if args.pack_memory:
        bench.pack_memory()
    if args.grid:
        bench.grid()
    if args.e2e and not (args.pack_only or args.methods_only):
        bench.e2e()
    if args.methods:
        bench.methods()
    figures = bench.figures
    figures.update(
        backbone=args.backbone,
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        precision=args.precision,
        batch=args.batch,
        classes=args.classes,
        text_classes=args.text_classes,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )
    figures["pack"] = args.pack
    checked = targets(figures, device, args.text_classes, extra_tags, args.pack)
    line = {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}
    line["targets"] = checked
    line["all_targets_met"] = all(t["met"] for t in checked.values())

    from rich.console import Console
    from rich.table import Table

    title = f"CoOp, {args.backbone} random weights, {args.device} {args.precision}"
    table = Table(title=title)
    table.add_column("what")
    table.add_column("seconds", justify="right")
    table.add_column("peak MB", justify="right")
    for name, seconds, peak in bench.rows:
        table.add_row(name, f"{seconds:.4f}", f"{peak / 2**20:.0f}" if peak else "")
    console = Console(stderr=True)
    if bench.rows:
        console.print(table)
    if args.methods:
        title = (
            f"Training cost per image, {args.methods_backbone} random weights, {args.classes} classes, "
            f"batch {args.methods_batch}, {args.device} {args.precision}"
        )
        table = Table(title=title)
        for column in ("method", "run", "ms per step", "ms per image", "vs CoOp"):
            table.add_column(column, justify="left" if column in ("method", "run") else "right")
        for name in method_names(args):
            step_ms = 1000 * figures[f"method_{name}_step_s"]
            ms, ratio = figures[f"method_{name}_ms_per_image"], figures[f"method_{name}_vs_coop"]
            table.add_row(name, bench.method_runs[name], f"{step_ms:.0f}", f"{ms:.1f}", f"{ratio:.2f}")
        console.print(table)
    text = json.dumps(line)
    print(text, flush=True)
    if args.out:
        args.out.write_text(text + "\n")
    return line


def _reexec_with_mmap_threshold() -> None:
    # Large allocations must go back to the OS when freed, so that the resident-set size tracks
    # live memory and each measurement's peak is its own (glibc raises its mmap threshold otherwise).
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])


if __name__ == "__main__":
    _reexec_with_mmap_threshold()
    main()

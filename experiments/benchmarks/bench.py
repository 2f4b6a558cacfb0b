"""CoOp's cost: the reference computation against this project's exact fast paths.

    make bench                       # ViT-B/32 (random weights), 224 px, batch 32, CPU fp32
    python experiments/benchmarks/bench.py --device cuda --precision bf16 --backbone ViT-B-16

Measures, in one process and on the same inputs:
  - the training step (forward + backward + SGD step) in (a) reference mode
    (model.text_fast=false: 77-position prompts, image encoder every step), (b) the default mode,
    (c) the default mode on cached image features;
  - the text side alone (prompt learner + text encoder, forward + backward, cross-entropy
    against `batch` image features) for `--text-classes` ImageNet classes, unified and
    class-specific, reference vs default;
  - data loading: JPEG decoding and train augmentation per image.
Prints a table, then one JSON line with the figures and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

# Large allocations must go back to the OS when freed, so that the resident-set size tracks
# live memory and each measurement's peak is its own (glibc raises its mmap threshold otherwise).
if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import open_clip  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from src.models.clip import FrozenCLIP  # noqa: E402
from src.models.coop import CoOp  # noqa: E402
from src.models.text_encoder import TextEncoder  # noqa: E402


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


def coop(clip: FrozenCLIP, classnames: list[str], fast: bool, class_specific: bool, device) -> CoOp:
    clip.text = TextEncoder(clip.model, fast=fast)
    torch.manual_seed(0)
    return CoOp(clip, classnames, class_specific=class_specific).to(device)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="ViT-B-32", help="open_clip architecture (random weights)")
    parser.add_argument("--classes", type=int, default=37, help="classes for the training step")
    parser.add_argument("--text-classes", type=int, default=250, help="classes for the text-side figures")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--skip-reference-text", action="store_true", help="skip the slow reference text runs"
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    clip = FrozenCLIP(args.backbone, None).to(device)
    autocast = (
        torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[args.precision])
        if args.precision != "fp32"
        else nullcontext()
    )
    size = clip.image_size
    images = torch.randn(args.batch, 3, size, size, device=device)
    names = open_clip.IMAGENET_CLASSNAMES[: args.classes]
    labels = torch.arange(args.batch, device=device) % len(names)
    rows: list[tuple[str, float, int]] = []
    figures: dict[str, float] = {}

    def train_step(module: CoOp, features: torch.Tensor | None = None):
        optimizer = torch.optim.SGD(module.prompt_learner.parameters(), lr=0.002, momentum=0.9)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                if features is None:
                    logits = module(images)
                else:
                    logits = module.logits(features, module.text_features())
                loss = F.cross_entropy(logits.float(), labels)
            loss.backward()
            optimizer.step()

        return step

    with torch.no_grad(), autocast:
        cached = clip.encode_image(images)
    # (fast text encoder, cached image features) per mode; the modules share one CLIP, so each is
    # built right before it is measured
    modes = {"step_reference": (False, None), "step_default": (True, None), "step_cached": (True, cached)}
    for key, (fast, features) in modes.items():
        step = train_step(coop(clip, names, fast, False, device), features)
        seconds, peak = measure(step, device, args.repeats)
        rows.append((f"{key} ({args.classes} classes, batch {args.batch})", seconds, peak))
        figures[f"{key}_s"] = seconds
        figures[f"{key}_peak_mb"] = peak / 2**20

    text_names = open_clip.IMAGENET_CLASSNAMES[: args.text_classes]
    text_labels = torch.arange(args.batch, device=device) % len(text_names)
    for kind, class_specific in (("unified", False), ("csc", True)):
        for mode, fast in (("reference", False), ("default", True)):
            if mode == "reference" and args.skip_reference_text:
                continue
            module = coop(clip, text_names, fast, class_specific, device)

            def text_step(module: CoOp = module) -> None:
                module.prompt_learner.ctx.grad = None
                with autocast:
                    loss = F.cross_entropy(module.logits(cached, module.text_features()).float(), text_labels)
                loss.backward()

            seconds, peak = measure(text_step, device, 1 if mode == "reference" else args.repeats)
            rows.append((f"text {args.text_classes} {kind} {mode}", seconds, peak))
            figures[f"text{args.text_classes}_{kind}_{mode}_s"] = seconds
            figures[f"text{args.text_classes}_{kind}_{mode}_peak_mb"] = peak / 2**20
            del module

    decode, augment = data_loading_cost(size)
    rows.append(("JPEG decode per image", decode, 0))
    rows.append(("train augmentation per image", augment, 0))
    figures.update({"decode_per_image_s": decode, "augment_per_image_s": augment})

    figures["step_speedup"] = figures["step_reference_s"] / figures["step_default_s"]
    figures["cached_step_speedup"] = figures["step_reference_s"] / figures["step_cached_s"]
    t = args.text_classes
    if not args.skip_reference_text:
        for kind in ("unified", "csc"):
            figures[f"text{t}_{kind}_speedup"] = (
                figures[f"text{t}_{kind}_reference_s"] / figures[f"text{t}_{kind}_default_s"]
            )
        figures[f"text{t}_csc_peak_mem_ratio"] = (
            figures[f"text{t}_csc_default_peak_mb"] / figures[f"text{t}_csc_reference_peak_mb"]
        )
    figures.update(
        backbone=args.backbone,
        device=str(device),
        precision=args.precision,
        batch=args.batch,
        classes=args.classes,
        text_classes=t,
        threads=torch.get_num_threads(),
    )

    table = Table(
        title=f"CoOp step, {args.backbone} random weights, {size} px, {args.device} {args.precision}"
    )
    table.add_column("what")
    table.add_column("seconds", justify="right")
    table.add_column("peak MB", justify="right")
    for name, seconds, peak in rows:
        table.add_row(name, f"{seconds:.4f}", f"{peak / 2**20:.0f}" if peak else "")
    Console(stderr=True).print(table)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}))


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


if __name__ == "__main__":
    main()

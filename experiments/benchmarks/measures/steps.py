"""The training step (reference, default, cached features), the text side per path, exactness on
the device, and the data loading cost."""

from __future__ import annotations

import time
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from experiments.benchmarks.measures.common import (
    BenchBase,
    measure,
)
from src.methods.coop import CoOp
from src.models.text_encoder import TextEncoder


class Steps(BenchBase):
    """The training step (reference, default, cached features), the text side per path, exactness on"""

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

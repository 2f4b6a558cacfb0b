"""The paper's few-shot grid in GPU hours, reference against default and packed (`--grid`)."""

from __future__ import annotations

import open_clip
import torch

from experiments.benchmarks.measures.common import (
    GRID_DATASETS,
    GRID_EPOCHS,
    GRID_PACK,
    GRID_SEEDS,
    GRID_VARIANTS,
    BenchBase,
    measure,
)


class Grid(BenchBase):
    """The paper's few-shot grid in GPU hours, reference against default and packed (`--grid`)."""

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

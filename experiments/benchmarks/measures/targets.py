"""The targets of each device kind, checked against the figures."""

from __future__ import annotations

import torch

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

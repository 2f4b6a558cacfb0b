"""k-shot subsets: a pure function of (split contents, shots, seed)."""

from __future__ import annotations

import random
from collections import defaultdict

from src.data.samples import Sample


def few_shot(items: list[Sample], shots: int, seed: int) -> list[Sample]:
    """`shots` images per class drawn at random (seeded); a class with fewer keeps them all.

    Items are sorted by path first, so the subset does not depend on the order in which a
    reader listed them, on the machine, or on the number of workers or GPUs.
    """
    if shots < 1:
        raise ValueError(f"shots={shots}: the number of images per class must be at least 1")
    by_label: dict[int, list[Sample]] = defaultdict(list)
    for item in items:
        by_label[item.label].append(item)
    rng = random.Random(seed)
    chosen: list[Sample] = []
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda s: s.path)
        chosen.extend(group if len(group) <= shots else rng.sample(group, shots))
    return chosen

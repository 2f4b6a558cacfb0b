"""Noisy few-shot labels: a seeded fraction of the k-shot training labels flipped to other classes,
for robustness studies. Applied after sampling, so the images drawn are those of the clean run."""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from pathlib import Path

from src.common.files import write_json
from src.data.samples import Sample, relative_path


def flip_count(rate: float, n: int) -> int:
    """How many of a class's `n` images get a wrong label: round(rate * n), halves rounded up (so
    16 shots at 12.5 / 25 / 50 % flip 2 / 4 / 8 per class; 1 shot at 25 % flips none)."""
    return math.floor(rate * n + 0.5)


def check_rate(rate: float) -> None:
    if not 0 <= rate <= 1:
        raise ValueError(f"data.label_noise={rate}: give the fraction of flipped labels, from 0 to 1")


def flip_labels(
    items: list[Sample], rate: float, seed: int, classnames: list[str]
) -> tuple[list[Sample], list[tuple[Sample, int]]]:
    """`items` with `flip_count(rate, n_c)` images of each class c (n_c of them, chosen at random)
    relabelled to a class drawn uniformly among the other classes; the order of items is kept.

    Returns the new list and the flipped items as (original item, noisy label). Per class, so
    every class keeps the same share of clean labels. A function of (items, rate, seed) only.
    """
    check_rate(rate)
    if rate > 0 and len(classnames) < 2:
        raise ValueError("data.label_noise > 0 needs at least 2 classes to flip labels between")
    by_label: dict[int, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        by_label[item.label].append(index)
    rng = random.Random(f"label_noise:{seed}")
    noisy = list(items)
    flipped = []
    for label in sorted(by_label):
        indices = sorted(by_label[label], key=lambda i: items[i].path)
        chosen = rng.sample(indices, flip_count(rate, len(indices)))
        for index in sorted(chosen, key=lambda i: items[i].path):  # not the input's order
            new = rng.choice([c for c in range(len(classnames)) if c != label])
            noisy[index] = items[index]._replace(label=new, classname=classnames[new])
            flipped.append((items[index], new))
    return noisy, flipped


def record_in_fewshot_file(
    path: str | Path, rate: float, flipped: list[tuple[Sample, int]], root: Path
) -> None:
    """Adds the noise to a saved few-shot list (fewshot.json): the rate and, per flipped image, its
    path, original label and noisy label. The list's own rows keep the true labels, so the file
    still reloads with `data.fewshot_file`; the same `data.label_noise` and seed flip the same ones."""
    path = Path(path)
    data = json.loads(path.read_text())
    data["label_noise"] = {
        "rate": rate,
        "flipped": [[relative_path(item.path, root), item.label, new] for item, new in flipped],
    }
    write_json(path, data)

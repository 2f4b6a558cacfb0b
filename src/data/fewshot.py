"""k-shot subsets: a pure function of (split contents, shots, seed), saved with each run and
reusable."""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from pathlib import Path

from src.data.datasets.base import DatasetError
from src.data.samples import Sample, Splits
from src.files import write_json


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


def save_fewshot(
    path: str | Path, root: Path, train: list[Sample], val: list[Sample], shots: int, seed: int
) -> Path:
    """The chosen images as JSON, paths relative to the dataset folder so the list works on any machine
    that has the same data: give it back as `data.fewshot_file` to rerun on exactly this subset."""

    def rows(items: list[Sample]) -> list[list]:
        return [[_relative(item.path, root), item.label, item.classname] for item in items]

    return write_json(
        path, {"root": str(root), "shots": shots, "seed": seed, "train": rows(train), "val": rows(val)}
    )


def load_fewshot(path: str | Path, root: Path, splits: Splits) -> tuple[list[Sample], list[Sample]]:
    """A saved list (`save_fewshot`), checked against the split: every image must be in it, with
    the same label."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        rows = {key: [(str(rel), int(label)) for rel, label, _ in data[key]] for key in ("train", "val")}
    except FileNotFoundError as err:
        raise DatasetError(f"data.fewshot_file={path} not found: give the fewshot.json of a run") from err
    except (json.JSONDecodeError, KeyError, ValueError, TypeError) as err:
        raise DatasetError(
            f"data.fewshot_file={path} is not a few-shot list ({err}): give a run's fewshot.json"
        ) from err
    chosen = {}
    for key, pool in (("train", splits.train), ("val", splits.val)):
        by_path = {os.path.normpath(item.path): item for item in pool}
        chosen[key] = []
        for rel, label in rows[key]:
            item = by_path.get(os.path.normpath(root / rel))
            if item is None or item.label != label:
                raise DatasetError(
                    f"data.fewshot_file={path}: {rel} (label {label}) is not in the {key} split of {root}: "
                    "the list was made for other data; give the matching list or drop data.fewshot_file"
                )
            chosen[key].append(item)
    return chosen["train"], chosen["val"]


def _relative(path: str, root: Path) -> str:
    return Path(path).relative_to(root).as_posix() if Path(path).is_relative_to(root) else path

"""What every dataset reader shares: the split files, per-class splitting and clear errors."""

from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from pathlib import Path

from src.data.samples import Sample, Splits

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class DatasetError(ValueError):
    """A dataset folder or file is missing or malformed; the message says what to do."""


class DatasetReader:
    """Turns a dataset folder into train/val/test lists of (path, label, classname)."""

    folder: str = ""  # the folder name under $DATA, as in the reference's preparation guide

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def read(self) -> Splits:
        if not self.root.is_dir():
            raise DatasetError(
                f"dataset folder {self.root} not found: lay the data out as in the README "
                f"('Data layout') or point paths.data_dir at the folder holding {self.root.name}/"
            )
        return self._read()

    def _read(self) -> Splits:
        raise NotImplementedError

    def require(self, path: Path, what: str) -> Path:
        if not path.exists():
            raise DatasetError(f"{path} not found: {what}")
        return path


def read_split_json(path: Path, image_dir: Path) -> Splits:
    """The reference's split_zhou_*.json: {"train"|"val"|"test": [[rel_path, label, name], ...]}."""
    try:
        raw = json.loads(path.read_text())
        splits = {
            key: [Sample(str(image_dir / rel), int(label), name) for rel, label, name in raw[key]]
            for key in ("train", "val", "test")
        }
    except (json.JSONDecodeError, KeyError, ValueError, TypeError) as err:
        raise DatasetError(
            f"{path} is not a valid split file ({err}): delete it to have it made again"
        ) from err
    return Splits(**splits, classnames=classnames_of(splits["train"] + splits["test"]))


def classnames_of(items: list[Sample]) -> list[str]:
    names = {item.label: item.classname for item in items}
    if sorted(names) != list(range(len(names))):
        raise DatasetError(f"labels must be 0..{len(names) - 1}; found {sorted(names)[:10]} ...")
    return [names[label] for label in range(len(names))]


def split_per_class(
    items: list[Sample], p_train: float = 0.5, p_val: float = 0.2, seed: int = 1
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Each class split train/val/test by fractions (the reference's 50/20/30), deterministically."""
    by_label: dict[int, list[Sample]] = defaultdict(list)
    for item in items:
        by_label[item.label].append(item)
    rng = random.Random(seed)
    train, val, test = [], [], []
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda s: s.path)
        rng.shuffle(group)
        n_train = round(len(group) * p_train)
        n_val = round(len(group) * p_val)
        train += group[:n_train]
        val += group[n_train : n_train + n_val]
        test += group[n_train + n_val :]
    return train, val, test


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)

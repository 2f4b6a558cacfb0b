"""The UCI handwritten digits shipped by scikit-learn (1,797 real 8x8 scans, 10 classes).

The scans are written once as 32 px PNG files (dark ink on white) so that every method reads them
like any other image folder. Half of each class pre-trains the project's tiny CLIP
(`python -m src.models.pretrain_tiny`); only the other half, never seen in pre-training, is split
into train / val / test (40/20/40 per class) for prompt learning and testing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from src.data.datasets.base import DatasetReader, list_images, split_off, split_per_class
from src.data.samples import Sample, Splits

CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMAGE_SIZE = 32  # the input size of the tiny CLIP: the transforms then leave the images as they are
PRETRAIN_FRACTION = 0.5


def render(scan: np.ndarray, size: int = IMAGE_SIZE) -> Image.Image:
    """An 8x8 scan valued 0..16 (ink) as a `size` px RGB image, dark ink on white paper."""
    grey = (255 - scan * (255 / 16)).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")


def write_digits(root: Path) -> None:
    """Writes root/<digit>/<index>.png for every scan, all at once: a folder that exists is complete."""
    if root.is_dir():
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        digits = load_digits()
        for index, (scan, label) in enumerate(zip(digits.images, digits.target, strict=True)):
            folder = tmp / str(label)
            folder.mkdir(exist_ok=True)
            render(scan).save(folder / f"{index:04d}.png")
        os.rename(tmp, root)
    except OSError:
        if not root.is_dir():  # another run writing the same folder at the same time won the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_digits(root: Path) -> tuple[list[Sample], list[Sample]]:
    """(held out, pre-training): each class split in half, deterministically."""
    write_digits(root)
    items = [
        Sample(str(path), label, name)
        for label, name in enumerate(CLASSNAMES)
        for path in list_images(root / str(label))
    ]
    return split_off(items, fraction=PRETRAIN_FRACTION)


class Digits(DatasetReader):
    name = "digits"
    folder = "digits"
    in_prepare_guide = False  # made from scikit-learn's copy, nothing to download

    def read(self) -> Splits:
        write_digits(self.root)  # the folder is made here, not laid out by the user
        return super().read()

    def _read(self) -> Splits:
        held_out, _ = read_digits(self.root)
        train, val, test = split_per_class(held_out, p_train=0.4, p_val=0.2)
        return Splits(train, val, test, CLASSNAMES)

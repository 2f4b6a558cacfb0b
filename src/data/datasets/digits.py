"""The UCI handwritten digits shipped by scikit-learn (1,797 real 8x8 scans, 10 classes).

The scans are written once as 32 px PNG files so that every method reads them like any other image
folder. Half of each class pre-trains the project's tiny CLIP (`python -m src.models.pretrain_tiny`)
in the `scan` look (black ink on white paper); only the other half, never seen in pre-training, is
split into train / val / test (40/20/40 per class) for prompt learning and testing. That half is
shown in the dataset's look: by default `notepad` (blue ink on yellow paper), a look the tiny CLIP
never saw, so that the hand-made prompt is as far from the images as CLIP's prompts are on, say,
satellite photos (EuroSAT) -- and a prompt learned from a few labelled images has something to gain.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from sklearn.datasets import load_digits

from src.common.files import atomic_folder
from src.common.messages import one_of
from src.data.datasets.base import DatasetReader, images_in_class_folders, split_off, split_per_class
from src.data.samples import Sample, Splits

CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMAGE_SIZE = 32  # the input size of the tiny CLIP: the transforms then leave the images as they are
PRETRAIN_FRACTION = 0.5
# (ink, paper) colours of each look the scans can be rendered in.
LOOKS = {
    "scan": ((0, 0, 0), (255, 255, 255)),
    "notepad": ((20, 40, 160), (250, 230, 120)),
}
PRETRAINING_LOOK = "scan"


def render(scan: np.ndarray, look: str = PRETRAINING_LOOK, size: int = IMAGE_SIZE) -> Image.Image:
    """An 8x8 scan valued 0..16 (ink) as a `size` px RGB image in one of the LOOKS."""
    ink, paper = LOOKS[look]
    grey = (255 - scan * (255 / 16)).round().clip(0, 255).astype(np.uint8)
    grey = Image.fromarray(grey, mode="L").resize((size, size), Image.Resampling.BICUBIC)
    return ImageOps.colorize(grey, black=ink, white=paper)


def write_scans(folder: Path, look: str) -> None:
    """folder/<digit>/<index>.png for every scan, in `look`."""
    digits = load_digits()
    for index, (scan, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        (folder / str(label)).mkdir(exist_ok=True)
        render(scan, look).save(folder / str(label) / f"{index:04d}.png")


def read_digits(root: Path, look: str = PRETRAINING_LOOK) -> tuple[list[Sample], list[Sample]]:
    """(held out, pre-training), rendered in `look` under root/<look>/: each class split in half,
    deterministically (the same scans whatever the look)."""
    if look not in LOOKS:
        raise ValueError(one_of("dataset.reader.look", look, sorted(LOOKS)))
    folder = atomic_folder(Path(root) / look, lambda tmp: write_scans(tmp, look))
    items = images_in_class_folders(folder, [str(label) for label in range(len(CLASSNAMES))], CLASSNAMES)
    return split_off(items, fraction=PRETRAIN_FRACTION)


class Digits(DatasetReader):
    name = "digits"
    folder = "digits"
    in_prepare_guide = False  # made from scikit-learn's copy, nothing to download

    def __init__(self, root: str | Path, look: str = "notepad") -> None:
        super().__init__(root)
        self.look = look

    def read(self) -> Splits:
        held_out, _ = read_digits(self.root, self.look)
        train, val, test = split_per_class(held_out, p_train=0.4, p_val=0.2)
        return Splits(train, val, test, CLASSNAMES)

"""Miniature datasets in the reference's on-disk layouts: a few small images per class, split and
label files in the real formats. Tests generate them; nothing is downloaded."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

PET_BREEDS = ["Abyssinian", "american_bulldog", "basset_hound", "Bengal"]


def write_image(path: Path, label: int, index: int, size: int = 40) -> None:
    """A small JPEG whose colour depends on the class, so that classes are learnable."""
    rng = random.Random(label * 1000 + index)
    base = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40), (40, 200, 200)][label % 5]
    image = Image.new("RGB", (size + rng.randint(0, 8), size))
    image.putdata(
        [tuple(min(255, max(0, c + rng.randint(-30, 30))) for c in base)] * (image.width * image.height)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG")


def make_oxford_pets(data_dir: Path, per_class: tuple[int, int, int] = (10, 3, 4)) -> Path:
    """oxford_pets/images/<Breed>_<n>.jpg, annotations/, split_zhou_OxfordPets.json."""
    root = data_dir / "oxford_pets"
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    index = 0
    for label, breed in enumerate(PET_BREEDS):
        for name, count in zip(split, per_class, strict=True):
            for _ in range(count):
                index += 1
                rel = f"{breed}_{index}.jpg"
                write_image(root / "images" / rel, label, index)
                split[name].append([rel, label, breed.lower()])
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    return root

"""SUN397: sun397/SUN397/<letter>/<category>/*.jpg, split_zhou_SUN397.json.

Without the split file, as the reference: the official partition 1 (ClassName.txt, Training_01.txt,
Testing_01.txt from Partitions.zip, in sun397/), its training list split 80/20 per class into
train/val; `/b/bakery/shop` is named "shop bakery" (the words after the letter, reversed).
"""

from __future__ import annotations

from src.data.datasets.base import DatasetError, SplitFileReader, split_off
from src.data.samples import Sample


class SUN397(SplitFileReader):
    name = "sun397"
    folder = "sun397"
    split_file = "split_zhou_SUN397.json"
    image_dir = "SUN397"
    split_rule = "Training_01.txt split 80/20 per class into train/val, Testing_01.txt as test"

    def make_split(self) -> tuple[list[Sample], list[Sample], list[Sample]]:
        names_file = self.require(self.root / "ClassName.txt", "the class list of Partitions.zip")
        lines = names_file.read_text().splitlines()
        categories = [line.strip().lstrip("/") for line in lines if line.strip()]
        labels = {category: label for label, category in enumerate(categories)}
        train, val = split_off(self._read_list("Training_01.txt", labels), 0.2)
        return train, val, self._read_list("Testing_01.txt", labels)

    def _read_list(self, name: str, labels: dict[str, int]) -> list[Sample]:
        """Lines `/a/abbey/sun_aaa.jpg`."""
        path = self.require(self.root / name, "a list of Partitions.zip")
        items = []
        for line in path.read_text().splitlines():
            image = line.strip().lstrip("/")
            if not image:
                continue
            category = image.rsplit("/", 1)[0]
            if category not in labels:
                raise DatasetError(f"{path}: {image} is in no class of ClassName.txt: fix either file")
            name = " ".join(reversed(category.split("/")[1:]))
            items.append(Sample(str(self.images / image), labels[category], name))
        return items

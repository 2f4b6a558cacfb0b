"""Oxford-IIIT Pets: oxford_pets/images/*.jpg, annotations/, split_zhou_OxfordPets.json.

Without the split file, as the reference: annotations/trainval.txt split 80/20 per class into
train/val, annotations/test.txt as the test set; the class name is the lower-cased breed of the
image name (`Abyssinian_100` -> `abyssinian`).
"""

from __future__ import annotations

from src.data.datasets.base import SplitFileReader, split_off
from src.data.samples import Sample


class OxfordPets(SplitFileReader):
    name = "oxford_pets"
    folder = "oxford_pets"
    split_file = "split_zhou_OxfordPets.json"
    image_dir = "images"
    split_rule = "annotations/trainval.txt split 80/20 per class into train/val, annotations/test.txt as test"

    def make_split(self) -> tuple[list[Sample], list[Sample], list[Sample]]:
        train, val = split_off(self._read_list("trainval.txt"), 0.2)
        return train, val, self._read_list("test.txt")

    def _read_list(self, name: str) -> list[Sample]:
        """Lines `<image name> <class id from 1> <species> <breed id>`."""
        path = self.require(self.root / "annotations" / name, f"the official {name} of the pets annotations")
        items = []
        for line in path.read_text().splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            image, class_id, *_ = line.split()
            breed = image.rsplit("_", 1)[0].lower()
            items.append(Sample(str(self.images / f"{image}.jpg"), int(class_id) - 1, breed))
        return items

"""FGVC Aircraft: fgvc_aircraft/images/<id>.jpg, variants.txt (the class order) and the official
images_variant_{train,val,test}.txt with lines `<image id> <variant name with spaces>`."""

from __future__ import annotations

from src.data.datasets.base import DatasetError, DatasetReader
from src.data.samples import Sample, Splits

SPLITS = ("train", "val", "test")


class FGVCAircraft(DatasetReader):
    name = "fgvc_aircraft"
    folder = "fgvc_aircraft"

    def _read(self) -> Splits:
        variants = self.require(self.root / "variants.txt", "the class list of FGVC Aircraft")
        classnames = [line.strip() for line in variants.read_text().splitlines() if line.strip()]
        labels = {name: label for label, name in enumerate(classnames)}
        train, val, test = (self._read_list(f"images_variant_{s}.txt", labels) for s in SPLITS)
        return Splits(train, val, test, classnames)

    def _read_list(self, name: str, labels: dict[str, int]) -> list[Sample]:
        path = self.require(self.root / name, "an official split list of FGVC Aircraft")
        items = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            image, _, variant = line.strip().partition(" ")
            if variant not in labels:
                raise DatasetError(f"{path}:{number}: {variant!r} is not in variants.txt: fix either file")
            items.append(Sample(str(self.root / "images" / f"{image}.jpg"), labels[variant], variant))
        return items

"""Stanford Cars: stanford_cars/cars_train/, cars_test/, devkit/, split_zhou_StanfordCars.json (its
paths are relative to the dataset folder).

Without the split file, as the reference: devkit/cars_train_annos.mat split 80/20 per class into
train/val, cars_test_annos_withlabels.mat as the test set, class names from devkit/cars_meta.mat
with the year moved to the front ("AM General Hummer SUV 2000" -> "2000 AM General Hummer SUV").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.io import loadmat

from src.data.datasets.base import SplitFileReader, split_off
from src.data.samples import Sample


class StanfordCars(SplitFileReader):
    name = "stanford_cars"
    folder = "stanford_cars"
    split_file = "split_zhou_StanfordCars.json"
    image_dir = ""
    split_rule = "devkit/cars_train_annos.mat split 80/20 per class into train/val, the test labels as test"

    def make_split(self) -> tuple[list[Sample], list[Sample], list[Sample]]:
        devkit = self.root / "devkit"
        meta = self.require(devkit / "cars_meta.mat", "the class names of the car devkit")
        names = np.atleast_1d(loadmat(meta, squeeze_me=True)["class_names"])
        classnames = [_year_first(str(name)) for name in names]
        train_annos = self.require(devkit / "cars_train_annos.mat", "the train labels of the car devkit")
        test_annos = self._test_annotations()
        train, val = split_off(self._read_annotations("cars_train", train_annos, classnames), 0.2)
        return train, val, self._read_annotations("cars_test", test_annos, classnames)

    def _test_annotations(self) -> Path:
        # the guide puts it in the dataset folder; some copies keep it in devkit/
        name = "cars_test_annos_withlabels.mat"
        if (self.root / "devkit" / name).exists():
            return self.root / "devkit" / name
        return self.require(self.root / name, "the test labels of Stanford Cars")

    def _read_annotations(self, image_dir: str, annotations: Path, classnames: list[str]) -> list[Sample]:
        items = []
        for record in np.atleast_1d(loadmat(annotations, squeeze_me=True)["annotations"]):
            label = int(record["class"]) - 1
            items.append(Sample(str(self.root / image_dir / str(record["fname"])), label, classnames[label]))
        return items


def _year_first(name: str) -> str:
    *words, year = name.split(" ")
    return " ".join([year, *words])

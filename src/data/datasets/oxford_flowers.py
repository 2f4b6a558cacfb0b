"""Oxford Flowers 102: oxford_flowers/jpg/image_NNNNN.jpg, imagelabels.mat, cat_to_name.json,
split_zhou_OxfordFlowers.json.

Without the split file, as the reference: image i+1 has label imagelabels.mat[i], named by
cat_to_name.json ({"1": "pink primrose", ...}), and each class is split 50/20/30.
"""

from __future__ import annotations

import numpy as np
from scipy.io import loadmat

from src.data.datasets.base import (
    DatasetError,
    SplitFileReader,
    map_classnames,
    read_classnames,
    split_per_class,
)
from src.data.samples import Sample


class OxfordFlowers(SplitFileReader):
    name = "oxford_flowers"
    folder = "oxford_flowers"
    split_file = "split_zhou_OxfordFlowers.json"
    image_dir = "jpg"
    split_rule = "each class of imagelabels.mat split 50/20/30 into train/val/test"

    def make_split(self) -> tuple[list[Sample], list[Sample], list[Sample]]:
        labels_file = self.require(self.root / "imagelabels.mat", "the official flower labels")
        names_file = self.require(self.root / "cat_to_name.json", "the flower names of CoOp's guide")
        labels = [int(label) for label in np.atleast_1d(loadmat(labels_file, squeeze_me=True)["labels"])]
        ids = sorted(set(labels))
        if ids != list(range(1, len(ids) + 1)):
            raise DatasetError(f"{labels_file}: labels must be 1..{len(ids)}, found {ids[:10]} ...")
        classnames = map_classnames([str(i) for i in ids], read_classnames(names_file), names_file)
        items = [
            Sample(str(self.images / f"image_{index:05d}.jpg"), label - 1, classnames[label - 1])
            for index, label in enumerate(labels, 1)
        ]
        return split_per_class(items, p_train=0.5, p_val=0.2)

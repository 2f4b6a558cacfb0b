"""Textile photos shipped by the PyPI package conformal-clip-data: nominal / local / global defect.

The package has no split: the project splits each class 50/20/30 deterministically, as the
reference does for datasets without a split file.
"""

from __future__ import annotations

from pathlib import Path

import conformal_clip_data

from src.data.datasets.base import DatasetReader, list_images, split_per_class
from src.data.samples import Sample, Splits

# Words for the prompts: the folder names alone say little to a text encoder.
CLASSNAMES = {
    "global": "fabric with a global defect",
    "local": "fabric with a local defect",
    "nominal": "flawless fabric",
}


class Textile(DatasetReader):
    folder = "textile"

    def __init__(self, root: str | Path | None = None) -> None:
        super().__init__(root or conformal_clip_data.textile_simulated_root())

    def _read(self) -> Splits:
        items = []
        for label, folder in enumerate(sorted(CLASSNAMES)):
            directory = self.require(self.root / folder, "reinstall conformal-clip-data")
            items += [Sample(str(p), label, CLASSNAMES[folder]) for p in list_images(directory)]
        train, val, test = split_per_class(items)
        return Splits(train, val, test, [CLASSNAMES[f] for f in sorted(CLASSNAMES)])

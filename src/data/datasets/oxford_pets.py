"""Oxford-IIIT Pets: oxford_pets/images/*.jpg with the reference's split_zhou_OxfordPets.json."""

from __future__ import annotations

from src.data.datasets.base import DatasetReader, read_split_json
from src.data.samples import Splits


class OxfordPets(DatasetReader):
    folder = "oxford_pets"

    def _read(self) -> Splits:
        split_file = self.require(
            self.root / "split_zhou_OxfordPets.json",
            "download split_zhou_OxfordPets.json from the CoOp data guide into the dataset folder",
        )
        return read_split_json(split_file, self.root / "images")

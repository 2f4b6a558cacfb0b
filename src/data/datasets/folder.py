"""Custom data without code: `dataset=folder dataset.root=DIR`.

DIR holds one sub-folder of images per class, or train/ (and optionally val/ and test/) folders
each with one sub-folder per class; a missing val or test set is split off train deterministically.
Labels follow the sorted class folder names; an optional class-name file maps folder names to the
words used in the prompt (`<folder> <words>` lines, or a JSON object).
"""

from __future__ import annotations

from pathlib import Path

from src.data.datasets.base import (
    DatasetError,
    DatasetReader,
    class_folders,
    fill_missing_splits,
    list_images,
    map_classnames,
    read_classnames,
)
from src.data.samples import Sample, Splits

SPLITS = ("train", "val", "test")


class Folder(DatasetReader):
    name = "folder"
    in_prepare_guide = False

    def __init__(self, root: str | Path | None, classnames: str | Path | None = None) -> None:
        if root is None:
            raise DatasetError("dataset=folder needs dataset.root=<folder with one sub-folder per class>")
        super().__init__(root)
        self.classnames_file = Path(classnames) if classnames else None

    def _read(self) -> Splits:
        parts = {split: self.root / split for split in SPLITS if (self.root / split).is_dir()}
        if parts and "train" not in parts:
            raise DatasetError(f"{self.root} has {'/, '.join(parts)}/ but no train/: add train/<class>/")
        directories = parts or {"train": self.root}
        folders = sorted(set().union(*(class_folders(d) for d in directories.values())))
        if not folders:
            raise DatasetError(
                f"{self.root} has no class folders: put the images of each class in a sub-folder named "
                "after it (or in train/<class>/, val/<class>/, test/<class>/)"
            )
        if self.classnames_file is None:
            classnames = folders
        else:
            names_file = self.require(self.classnames_file, "the class-name file given as dataset.classnames")
            classnames = map_classnames(folders, read_classnames(names_file), names_file)
        lists = {
            split: [
                Sample(str(image), label, classnames[label])
                for label, folder in enumerate(folders)
                if (directory / folder).is_dir()
                for image in list_images(directory / folder)
            ]
            for split, directory in directories.items()
        }
        if not lists["train"]:
            raise DatasetError(f"{directories['train']} has class folders ({folders[0]}, ..) but no images")
        train, val, test = fill_missing_splits(lists["train"], lists.get("val"), lists.get("test"))
        return Splits(train, val, test, classnames)

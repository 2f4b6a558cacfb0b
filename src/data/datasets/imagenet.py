"""ImageNet: imagenet/images/{train,val}/<wnid>/*, classnames.txt (`<wnid> <class name>` lines).

Labels follow the sorted wnid folders. As in the reference, the validation images are the test
set: ImageNet has no other labelled held-out images.
"""

from __future__ import annotations

from src.data.datasets.base import (
    DatasetReader,
    class_folders,
    images_in_class_folders,
    map_classnames,
    read_classnames,
)
from src.data.samples import Splits


class ImageNet(DatasetReader):
    name = "imagenet"
    folder = "imagenet"

    def _read(self) -> Splits:
        names_file = self.require(self.root / "classnames.txt", "ImageNet's class names (CoOp's file)")
        train_dir = self.require(self.root / "images" / "train", "the ImageNet train set, a folder per wnid")
        val_dir = self.require(self.root / "images" / "val", "the ImageNet val set, a folder per wnid")
        folders = class_folders(train_dir)
        classnames = map_classnames(folders, read_classnames(names_file), names_file)
        train = images_in_class_folders(train_dir, folders, classnames)
        test = images_in_class_folders(val_dir, folders, classnames)
        return Splits(train, test, test, classnames)

"""ImageNetV2 matched-frequency (test only): imagenetv2/imagenetv2-matched-frequency-format-val/<i>/*
where folder i is the class on line i of classnames.txt (ImageNet's order)."""

from __future__ import annotations

from src.data.datasets.base import DatasetReader, images_in_class_folders, read_classnames
from src.data.samples import Splits


class ImageNetV2(DatasetReader):
    name = "imagenetv2"
    folder = "imagenetv2"
    image_dir = "imagenetv2-matched-frequency-format-val"

    def _read(self) -> Splits:
        names_file = self.require(self.root / "classnames.txt", "copy imagenet/classnames.txt here")
        names = read_classnames(names_file)
        directory = self.require(self.root / self.image_dir, "the ImageNetV2 matched-frequency images")
        classnames = list(names.values())
        folders = [str(i) for i in range(len(classnames))]
        return Splits([], [], images_in_class_folders(directory, folders, classnames), classnames)

"""ImageNet-R (test only): imagenet-rendition/imagenet-r/<wnid>/* for the 200 classes present
(a README.txt sits beside them), classnames.txt."""

from __future__ import annotations

from src.data.datasets.base import TestOnlyClassFolders


class ImageNetR(TestOnlyClassFolders):
    name = "imagenet_r"
    folder = "imagenet-rendition"
    image_dir = "imagenet-r"

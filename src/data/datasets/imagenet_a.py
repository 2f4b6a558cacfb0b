"""ImageNet-A (test only): imagenet-adversarial/imagenet-a/<wnid>/* for the 200 classes present
(a README.txt sits beside them), classnames.txt."""

from __future__ import annotations

from src.data.datasets.base import TestOnlyClassFolders


class ImageNetA(TestOnlyClassFolders):
    name = "imagenet_a"
    folder = "imagenet-adversarial"
    image_dir = "imagenet-a"

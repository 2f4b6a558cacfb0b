"""ImageNet-Sketch (test only): imagenet-sketch/images/<wnid>/*, classnames.txt."""

from __future__ import annotations

from src.data.datasets.base import TestOnlyClassFolders


class ImageNetSketch(TestOnlyClassFolders):
    name = "imagenet_sketch"
    folder = "imagenet-sketch"
    image_dir = "images"

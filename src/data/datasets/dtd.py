"""Describable Textures: dtd/images/<class>/*, split_zhou_DescribableTextures.json (without it, each
class is split 50/20/30 as the reference does)."""

from __future__ import annotations

from src.data.datasets.base import ClassFolderReader


class DTD(ClassFolderReader):
    name = "dtd"
    folder = "dtd"
    split_file = "split_zhou_DescribableTextures.json"
    image_dir = "images"

"""Food-101: food-101/images/<class>/*, split_zhou_Food101.json.

Without the split file the reference does not use the official meta/train.txt and meta/test.txt:
it splits each class 50/20/30, and so does this reader.
"""

from __future__ import annotations

from src.data.datasets.base import ClassFolderReader


class Food101(ClassFolderReader):
    name = "food101"
    folder = "food-101"
    split_file = "split_zhou_Food101.json"
    image_dir = "images"

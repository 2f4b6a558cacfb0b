"""Caltech101: caltech-101/101_ObjectCategories/<class>/*, split_zhou_Caltech101.json.

Without the split file, as the reference: BACKGROUND_Google and Faces_easy are left out, four
plural folder names become singular class names, each class is split 50/20/30.
"""

from __future__ import annotations

from src.data.datasets.base import ClassFolderReader


class Caltech101(ClassFolderReader):
    name = "caltech101"
    folder = "caltech-101"
    split_file = "split_zhou_Caltech101.json"
    image_dir = "101_ObjectCategories"
    ignore = ("BACKGROUND_Google", "Faces_easy")
    renames = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}

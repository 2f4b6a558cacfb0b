"""EuroSAT: eurosat/2750/<class>/*, split_zhou_EuroSAT.json (without it, each class is split 50/20/30
and named with the reference's descriptive names)."""

from __future__ import annotations

from src.data.datasets.base import ClassFolderReader


class EuroSAT(ClassFolderReader):
    name = "eurosat"
    folder = "eurosat"
    split_file = "split_zhou_EuroSAT.json"
    image_dir = "2750"
    renames = {
        "AnnualCrop": "Annual Crop Land",
        "Forest": "Forest",
        "HerbaceousVegetation": "Herbaceous Vegetation Land",
        "Highway": "Highway or Road",
        "Industrial": "Industrial Buildings",
        "Pasture": "Pasture Land",
        "PermanentCrop": "Permanent Crop Land",
        "Residential": "Residential Buildings",
        "River": "River",
        "SeaLake": "Sea or Lake",
    }

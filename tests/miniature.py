"""Miniature datasets in the reference's on-disk layouts: a few small images per class, split and
label files in the real formats. Tests generate them; nothing is downloaded."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat

PET_BREEDS = ["Abyssinian", "american_bulldog", "basset_hound", "Bengal"]


def write_image(path: Path, label: int, index: int, size: int = 40) -> None:
    """A small JPEG whose colour depends on the class, so that classes are learnable."""
    rng = random.Random(label * 1000 + index)
    base = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40), (40, 200, 200)][label % 5]
    image = Image.new("RGB", (size + rng.randint(0, 8), size))
    image.putdata(
        [tuple(min(255, max(0, c + rng.randint(-30, 30))) for c in base)] * (image.width * image.height)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG")


def make_oxford_pets(data_dir: Path, per_class: tuple[int, int, int] = (10, 3, 4)) -> Path:
    """oxford_pets/images/<Breed>_<n>.jpg, annotations/, split_zhou_OxfordPets.json."""
    root = data_dir / "oxford_pets"
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    index = 0
    for label, breed in enumerate(PET_BREEDS):
        for name, count in zip(split, per_class, strict=True):
            for _ in range(count):
                index += 1
                rel = f"{breed}_{index}.jpg"
                write_image(root / "images" / rel, label, index)
                split[name].append([rel, label, breed.lower()])
    # the official lists (`<image> <class id from 1> <species> <breed id>`): trainval = train + val
    annotations = root / "annotations"
    annotations.mkdir(parents=True, exist_ok=True)
    for name, keys in (("trainval.txt", ("train", "val")), ("test.txt", ("test",))):
        lines = [f"{rel[:-4]} {label + 1} 1 {label + 1}" for key in keys for rel, label, _ in split[key]]
        (annotations / name).write_text("\n".join(lines) + "\n")
    (root / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    return root


# The other 14 datasets of the paper, each in the layout of the reference's preparation guide, with
# its split_zhou_*.json (made like the reference's: 50/20/30 per class, or 80/20 of the official
# train(val) list) where the reference has one.

WNIDS = {
    "n01440764": "tench",
    "n01443537": "goldfish",
    "n01484850": "great white shark",
    "n01491361": "tiger shark",
    "n01494475": "hammerhead shark",
    "n01496331": "electric ray",
}


def _images(directory: Path, names: list[str], label: int) -> list[str]:
    for index, name in enumerate(names):
        write_image(directory / name, label, index)
    return names


def _reference_split(per_class: list[tuple[list[str], int, str]], p_val: float = 0.2, p_train: float = 0.5):
    """A split_zhou_*.json body: each class's files cut in order (the reference shuffles first)."""
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for rels, label, name in per_class:
        n_train, n_val = round(len(rels) * p_train), round(len(rels) * p_val)
        for key, part in (("train", rels[:n_train]), ("val", rels[n_train : n_train + n_val])):
            split[key] += [[rel, label, name] for rel in part]
        split["test"] += [[rel, label, name] for rel in rels[n_train + n_val :]]
    return split


def _trainval_split(trainval: list[tuple[list[str], int, str]], test: list[tuple[list[str], int, str]]):
    """A split_zhou_*.json body from an official trainval/test pair: 20% of each class to val."""
    split = _reference_split(trainval, p_val=0.2, p_train=0.8)
    split["test"] = [[rel, label, name] for rels, label, name in test for rel in rels]
    return split


def _class_folder_dataset(
    root: Path, image_dir: str, folders: dict[str, str | None], split_file: str, n: int = 5
):
    """<image_dir>/<folder>/*.jpg; folders mapped to None are left out of the split (as the
    reference leaves out Caltech101's BACKGROUND_Google)."""
    per_class = []
    for folder, name in folders.items():
        rels = [f"{folder}/{folder.lower()}_{i:04d}.jpg" for i in range(1, n + 1)]
        _images(root / image_dir, rels, len(per_class))
        if name is not None:
            per_class.append((rels, len(per_class), name))
    (root / split_file).write_text(json.dumps(_reference_split(per_class)))
    return root


def _write_classnames(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{wnid} {name}\n" for wnid, name in WNIDS.items()))


def make_imagenet(data_dir: Path) -> Path:
    """imagenet/images/{train,val}/<wnid>/*.JPEG, classnames.txt (4 of its 6 classes present)."""
    root = data_dir / "imagenet"
    _write_classnames(root / "classnames.txt")
    for label, wnid in enumerate(list(WNIDS)[:4]):
        _images(root / "images" / "train" / wnid, [f"{wnid}_{i}.JPEG" for i in range(3)], label)
        _images(
            root / "images" / "val" / wnid, [f"ILSVRC2012_val_{label:05d}{i}.JPEG" for i in range(2)], label
        )
    return root


def make_caltech101(data_dir: Path) -> Path:
    folders = {"BACKGROUND_Google": None, "Faces": "face", "Faces_easy": None, "accordion": "accordion"}
    folders["airplanes"] = "airplane"
    return _class_folder_dataset(
        data_dir / "caltech-101", "101_ObjectCategories", folders, "split_zhou_Caltech101.json"
    )


def make_stanford_cars(data_dir: Path) -> Path:
    """cars_train/, cars_test/, devkit/{cars_meta,cars_train_annos}.mat, cars_test_annos_withlabels.mat."""
    root = data_dir / "stanford_cars"
    names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Tesla Model S Sedan 2012"]
    year_first = ["2000 AM General Hummer SUV", "2012 Acura RL Sedan", "2012 Tesla Model S Sedan"]
    (root / "devkit").mkdir(parents=True, exist_ok=True)
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": np.array([names], dtype=object)})
    fields = [(f, "O") for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
    per_split = {}
    for folder, per_class, mat in (
        ("cars_train", 5, root / "devkit" / "cars_train_annos.mat"),
        ("cars_test", 2, root / "cars_test_annos_withlabels.mat"),
    ):
        # classes interleaved, as in the real files
        labels = [i % len(names) for i in range(per_class * len(names))]
        annotations = np.zeros((1, len(labels)), dtype=fields)
        for i, label in enumerate(labels):
            fname = f"{i + 1:05d}.jpg"
            write_image(root / folder / fname, label, i)
            annotations[0, i] = (1, 1, 30, 30, np.uint8(label + 1), fname)
        savemat(mat, {"annotations": annotations})
        per_split[folder] = [
            ([f"{folder}/{i + 1:05d}.jpg" for i, y in enumerate(labels) if y == c], c, year_first[c])
            for c in range(len(names))
        ]
    split = _trainval_split(per_split["cars_train"], per_split["cars_test"])
    (root / "split_zhou_StanfordCars.json").write_text(json.dumps(split))
    return root


def make_oxford_flowers(data_dir: Path) -> Path:
    """jpg/image_NNNNN.jpg, imagelabels.mat (labels from 1), cat_to_name.json."""
    root = data_dir / "oxford_flowers"
    names = {"1": "pink primrose", "2": "hard-leaved pocket orchid", "3": "canterbury bells"}
    labels = [1 + i % 3 for i in range(15)]
    rels = _images(root / "jpg", [f"image_{i:05d}.jpg" for i in range(1, 16)], 0)
    savemat(root / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    (root / "cat_to_name.json").write_text(json.dumps(names))
    per_class = [
        ([r for r, y in zip(rels, labels, strict=True) if y == c], c - 1, names[str(c)]) for c in (1, 2, 3)
    ]
    (root / "split_zhou_OxfordFlowers.json").write_text(json.dumps(_reference_split(per_class)))
    return root


def make_food101(data_dir: Path) -> Path:
    """images/<class>/<id>.jpg, meta/{classes,train,test}.txt."""
    root = data_dir / "food-101"
    classes = ["apple_pie", "baby_back_ribs", "baklava"]
    _class_folder_dataset(root, "images", {c: c for c in classes}, "split_zhou_Food101.json")
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "meta" / "classes.txt").write_text("\n".join(classes) + "\n")
    for name, part in (("train.txt", slice(0, 3)), ("test.txt", slice(3, 5))):
        lines = [f"{c}/{c}_{i:04d}" for c in classes for i in range(1, 6)[part]]
        (root / "meta" / name).write_text("\n".join(lines) + "\n")
    return root


def make_fgvc_aircraft(data_dir: Path) -> Path:
    """images/<id>.jpg, variants.txt, images_variant_{train,val,test}.txt (`<id> <variant>`)."""
    root = data_dir / "fgvc_aircraft"
    variants = ["707-320", "A300B4", "Cessna 172"]
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "variants.txt").write_text("\n".join(variants) + "\n")
    image_id = 1000000
    for split, per_class in (("train", 3), ("val", 1), ("test", 2)):
        lines = []
        for label, variant in enumerate(variants):
            for _ in range(per_class):
                image_id += 1
                write_image(root / "images" / f"{image_id:07d}.jpg", label, image_id)
                lines.append(f"{image_id:07d} {variant}")
        (root / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def make_sun397(data_dir: Path) -> Path:
    """SUN397/<letter>/<category>/*.jpg and partition 1 (ClassName.txt, Training_01.txt, Testing_01.txt)."""
    root = data_dir / "sun397"
    categories = {
        "a/abbey": "abbey",
        "b/bakery/shop": "shop bakery",
        "o/outhouse/outdoor": "outdoor outhouse",
    }
    (root / "ClassName.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "ClassName.txt").write_text("".join(f"/{c}\n" for c in categories))
    per_split: dict[str, list] = {"Training_01.txt": [], "Testing_01.txt": []}
    for label, (category, name) in enumerate(categories.items()):
        rels = _images(root / "SUN397", [f"{category}/sun_{label}{i:03d}.jpg" for i in range(7)], label)
        per_split["Training_01.txt"].append((rels[:5], label, name))
        per_split["Testing_01.txt"].append((rels[5:], label, name))
    for file, per_class in per_split.items():
        (root / file).write_text("".join(f"/{rel}\n" for rels, _, _ in per_class for rel in rels))
    split = _trainval_split(per_split["Training_01.txt"], per_split["Testing_01.txt"])
    (root / "split_zhou_SUN397.json").write_text(json.dumps(split))
    return root


def make_dtd(data_dir: Path) -> Path:
    classes = ["banded", "blotchy", "braided"]
    return _class_folder_dataset(
        data_dir / "dtd", "images", {c: c for c in classes}, "split_zhou_DescribableTextures.json"
    )


def make_eurosat(data_dir: Path) -> Path:
    folders = {"AnnualCrop": "Annual Crop Land", "Forest": "Forest", "SeaLake": "Sea or Lake"}
    return _class_folder_dataset(data_dir / "eurosat", "2750", folders, "split_zhou_EuroSAT.json")


def make_ucf101(data_dir: Path) -> Path:
    """UCF-101-midframes/<Action_Name>/<video>.jpg, ucfTrainTestlist/{classInd,trainlist01,testlist01}.txt."""
    root = data_dir / "ucf101"
    actions = {"ApplyEyeMakeup": "Apply_Eye_Makeup", "Basketball": "Basketball", "YoYo": "Yo_Yo"}
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "classInd.txt").write_text("".join(f"{i} {a}\n" for i, a in enumerate(actions, 1)))
    per_split: dict[str, list] = {"trainlist01.txt": [], "testlist01.txt": []}
    train_lines, test_lines = [], []
    for label, (action, folder) in enumerate(actions.items()):
        videos = [f"v_{action}_g{g:02d}_c01" for g in range(1, 8)]
        _images(root / "UCF-101-midframes" / folder, [f"{v}.jpg" for v in videos], label)
        train_lines += [f"{action}/{v}.avi {label + 1}" for v in videos[:5]]
        test_lines += [f"{action}/{v}.avi" for v in videos[5:]]
        per_split["trainlist01.txt"].append(([f"{folder}/{v}.jpg" for v in videos[:5]], label, folder))
        per_split["testlist01.txt"].append(([f"{folder}/{v}.jpg" for v in videos[5:]], label, folder))
    (lists / "trainlist01.txt").write_text("\n".join(train_lines) + "\n")
    (lists / "testlist01.txt").write_text("\n".join(test_lines) + "\n")
    split = _trainval_split(per_split["trainlist01.txt"], per_split["testlist01.txt"])
    (root / "split_zhou_UCF101.json").write_text(json.dumps(split))
    return root


def make_imagenetv2(data_dir: Path) -> Path:
    """imagenetv2-matched-frequency-format-val/<i>/*.jpeg: folder i is line i of classnames.txt."""
    root = data_dir / "imagenetv2"
    _write_classnames(root / "classnames.txt")
    for label in range(len(WNIDS)):
        _images(
            root / "imagenetv2-matched-frequency-format-val" / str(label),
            [f"{label}a{i}.jpeg" for i in range(2)],
            label,
        )
    return root


def make_imagenet_sketch(data_dir: Path) -> Path:
    root = data_dir / "imagenet-sketch"
    _write_classnames(root / "classnames.txt")
    for label, wnid in enumerate(WNIDS):
        _images(root / "images" / wnid, [f"sketch_{i}.JPEG" for i in range(2)], label)
    return root


def _imagenet_subset(root: Path, image_dir: str, wnids: list[str]) -> Path:
    """200-class variants: only some wnid folders, with a README.txt beside them."""
    _write_classnames(root / "classnames.txt")
    for label, wnid in enumerate(wnids):
        _images(root / image_dir / wnid, [f"{wnid}_{i}.jpg" for i in range(2)], label)
    (root / image_dir / "README.txt").write_text("the 200 classes of this set\n")
    return root


def make_imagenet_a(data_dir: Path) -> Path:
    return _imagenet_subset(data_dir / "imagenet-adversarial", "imagenet-a", list(WNIDS)[1::2])


def make_imagenet_r(data_dir: Path) -> Path:
    return _imagenet_subset(data_dir / "imagenet-rendition", "imagenet-r", list(WNIDS)[0::2])


LAYOUTS = {
    "imagenet": make_imagenet,
    "caltech101": make_caltech101,
    "oxford_pets": make_oxford_pets,
    "stanford_cars": make_stanford_cars,
    "oxford_flowers": make_oxford_flowers,
    "food101": make_food101,
    "fgvc_aircraft": make_fgvc_aircraft,
    "sun397": make_sun397,
    "dtd": make_dtd,
    "eurosat": make_eurosat,
    "ucf101": make_ucf101,
    "imagenetv2": make_imagenetv2,
    "imagenet_sketch": make_imagenet_sketch,
    "imagenet_a": make_imagenet_a,
    "imagenet_r": make_imagenet_r,
}


def make_all(data_dir: Path) -> Path:
    """$DATA with a miniature of each of the 15 datasets of the paper."""
    for make in LAYOUTS.values():
        make(data_dir)
    return data_dir

"""Checks a dataset folder: what is present, what is missing and exactly how to get each piece.

python -m src.data.prepare oxford_pets --data-dir $DATA              # check, then read the splits
python -m src.data.prepare oxford_pets --data-dir $DATA --download   # fetch the images with torchvision

The layout is the one of the reference's preparation guide (CoOp's DATASETS.md), so a $DATA made
for the reference works unchanged. Where torchvision has a downloader, `--download` fetches into a
hidden staging folder beside the dataset and moves each finished piece into place: an interrupted
download never leaves a half-written file in the dataset folder.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from rich.console import Console
from rich.markup import escape

from src.data.datasets.base import DatasetError, DatasetReader

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
GUIDE_URL = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"


def drive(file_id: str) -> str:
    """A file of the reference's guide on Google Drive (a browser download: it asks to confirm)."""
    return f"https://drive.google.com/file/d/{file_id}/view?usp=sharing"


def paper_split(file_id: str) -> str:
    return f"the split of the paper: {drive(file_id)}"


@dataclass(frozen=True)
class Piece:
    """One file or folder of a dataset's layout and how to obtain it.

    role: "required"; "split" (the split_zhou_*.json: made on first use when absent); "labels"
    (official label lists, needed only to make the split when the split file is absent).
    """

    path: str
    how: str
    role: Literal["required", "split", "labels"] = "required"


IMAGENET_NAMES = (
    f"copy $DATA/imagenet/classnames.txt here (CoOp's file: {drive('1-61f_ol79pViBFDG_IDlUQSwoLcn2XXF')})"
)

GUIDE: dict[str, list[Piece]] = {
    "imagenet": [
        Piece(
            "images/train",
            "the ILSVRC2012 train set (https://image-net.org/download.php, after sign-up), one folder per "
            "wnid; or a symlink to a copy you already have",
        ),
        Piece(
            "images/val",
            "the ILSVRC2012 val set sorted into one folder per wnid, as images/train; or a symlink",
        ),
        Piece("classnames.txt", f"CoOp's class names: {drive('1-61f_ol79pViBFDG_IDlUQSwoLcn2XXF')}"),
    ],
    "caltech101": [
        Piece(
            "101_ObjectCategories",
            "extract 101_ObjectCategories.tar.gz here: it is inside caltech-101.zip from "
            "https://data.caltech.edu/records/mzrjq-6wc02 (the guide's URL, "
            "http://www.vision.caltech.edu/Image_Datasets/Caltech101/101_ObjectCategories.tar.gz, "
            "moved there)",
        ),
        Piece("split_zhou_Caltech101.json", paper_split("1hyarUivQE36mY6jSomru6Fjd-JzwcCzN"), "split"),
    ],
    "oxford_pets": [
        Piece("images", "extract https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz here"),
        Piece(
            "annotations/trainval.txt",
            "extract https://www.robots.ox.ac.uk/~vgg/data/pets/data/annotations.tar.gz here",
            "labels",
        ),
        Piece("annotations/test.txt", "in the same annotations.tar.gz", "labels"),
        Piece("split_zhou_OxfordPets.json", paper_split("1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs"), "split"),
    ],
    "stanford_cars": [
        Piece("cars_train", "extract http://ai.stanford.edu/~jkrause/car196/cars_train.tgz here"),
        Piece("cars_test", "extract http://ai.stanford.edu/~jkrause/car196/cars_test.tgz here"),
        Piece("devkit", "extract https://ai.stanford.edu/~jkrause/cars/car_devkit.tgz here", "labels"),
        Piece(
            "cars_test_annos_withlabels.mat",
            "http://ai.stanford.edu/~jkrause/car196/cars_test_annos_withlabels.mat",
            "labels",
        ),
        Piece("split_zhou_StanfordCars.json", paper_split("1ObCFbaAgVu0I-k_Au-gIUcefirdAuizT"), "split"),
    ],
    "oxford_flowers": [
        Piece("jpg", "extract https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz here"),
        Piece(
            "imagelabels.mat", "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/imagelabels.mat", "labels"
        ),
        Piece("cat_to_name.json", drive("1AkcxCXeK_RCGCEC_GvmWxjcjaNhu-at0"), "labels"),
        Piece("split_zhou_OxfordFlowers.json", paper_split("1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT"), "split"),
    ],
    "food101": [
        Piece(
            "images",
            "extract food-101.tar.gz (https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/) into "
            "$DATA: it makes food-101/",
        ),
        Piece("split_zhou_Food101.json", paper_split("1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl"), "split"),
    ],
    "fgvc_aircraft": [
        Piece(
            "images",
            "extract "
            "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz, "
            "keep its data/ folder and rename it to $DATA/fgvc_aircraft/",
        ),
        *(
            Piece(name, "in the data/ folder of the same archive")
            for name in (
                "variants.txt",
                "images_variant_train.txt",
                "images_variant_val.txt",
                "images_variant_test.txt",
            )
        ),
    ],
    "sun397": [
        Piece("SUN397", "extract http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz here"),
        *(
            Piece(
                name,
                "extract https://vision.princeton.edu/projects/2010/SUN/download/Partitions.zip here",
                "labels",
            )
            for name in ("ClassName.txt", "Training_01.txt", "Testing_01.txt")
        ),
        Piece("split_zhou_SUN397.json", paper_split("1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq"), "split"),
    ],
    "dtd": [
        Piece(
            "images",
            "extract https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz into $DATA: it "
            "makes dtd/",
        ),
        Piece(
            "split_zhou_DescribableTextures.json", paper_split("1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x"), "split"
        ),
    ],
    "eurosat": [
        Piece("2750", "extract http://madm.dfki.de/files/sentinel/EuroSAT.zip here"),
        Piece("split_zhou_EuroSAT.json", paper_split("1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o"), "split"),
    ],
    "ucf101": [
        Piece(
            "UCF-101-midframes",
            f"extract UCF-101-midframes.zip (the middle frame of each video, from the guide: "
            f"{drive('10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O')}) here",
        ),
        Piece(
            "ucfTrainTestlist",
            "extract https://www.crcv.ucf.edu/data/UCF101/UCF101TrainTestSplits-RecognitionTask.zip here",
            "labels",
        ),
        Piece("split_zhou_UCF101.json", paper_split("1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y"), "split"),
    ],
    "imagenetv2": [
        Piece(
            "imagenetv2-matched-frequency-format-val",
            "extract https://s3-us-west-2.amazonaws.com/imagenetv2public/imagenetv2-matched-frequency.tar.gz "
            "here (https://github.com/modestyachts/ImageNetV2)",
        ),
        Piece("classnames.txt", IMAGENET_NAMES),
    ],
    "imagenet_sketch": [
        Piece(
            "images",
            "the ImageNet-Sketch archive (links at https://github.com/HaohanWang/ImageNet-Sketch), extracted "
            "so that its wnid folders are in imagenet-sketch/images/",
        ),
        Piece("classnames.txt", IMAGENET_NAMES),
    ],
    "imagenet_a": [
        Piece(
            "imagenet-a",
            "extract https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar here "
            "(https://github.com/hendrycks/natural-adv-examples)",
        ),
        Piece("classnames.txt", IMAGENET_NAMES),
    ],
    "imagenet_r": [
        Piece(
            "imagenet-r",
            "extract https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar here "
            "(https://github.com/hendrycks/imagenet-r)",
        ),
        Piece("classnames.txt", IMAGENET_NAMES),
    ],
}


@dataclass(frozen=True)
class Download:
    """A torchvision.datasets class that downloads a dataset, and where its pieces go: path in
    torchvision's layout (under the staging folder) -> path in the reference's layout."""

    dataset: str
    moves: dict[str, str]


FGVC_DATA = "fgvc-aircraft-2013b/data"
DOWNLOADS: dict[str, Download] = {
    "caltech101": Download("Caltech101", {"caltech101/101_ObjectCategories": "101_ObjectCategories"}),
    "oxford_pets": Download(
        "OxfordIIITPet", {"oxford-iiit-pet/images": "images", "oxford-iiit-pet/annotations": "annotations"}
    ),
    "oxford_flowers": Download(
        "Flowers102", {"flowers-102/jpg": "jpg", "flowers-102/imagelabels.mat": "imagelabels.mat"}
    ),
    "food101": Download("Food101", {"food-101/images": "images", "food-101/meta": "meta"}),
    "fgvc_aircraft": Download(
        "FGVCAircraft",
        {
            f"{FGVC_DATA}/{name}": name
            for name in (
                "images",
                "variants.txt",
                "images_variant_train.txt",
                "images_variant_val.txt",
                "images_variant_test.txt",
            )
        },
    ),
    "sun397": Download("SUN397", {"SUN397": "SUN397"}),
    "dtd": Download("DTD", {"dtd/dtd/images": "images", "dtd/dtd/labels": "labels", "dtd/dtd/imdb": "imdb"}),
    "eurosat": Download("EuroSAT", {"eurosat/2750": "2750"}),
}


def dataset_reader(name: str, data_dir: str | Path) -> DatasetReader:
    """The reader that `python -m src.train dataset=NAME paths.data_dir=DIR` would use."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"dataset={name}", f"paths.data_dir={data_dir}"])
    return instantiate(cfg.dataset.reader)


def present(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def check(name: str, root: Path) -> list[tuple[Piece, str]]:
    """Each piece of the layout with its state: "present", "missing", or why neither matters."""
    pieces = GUIDE[name]
    has_split = any(present(root / p.path) for p in pieces if p.role == "split")
    has_labels = all(present(root / p.path) for p in pieces if p.role == "labels")
    states = []
    for piece in pieces:
        if present(root / piece.path):
            state = "present"
        elif piece.role == "labels" and has_split:
            state = "not needed: the split file is there"
        elif piece.role == "split" and has_labels:
            state = "absent: made on first use as the reference makes it (not the paper's split)"
        else:
            state = "missing"
        states.append((piece, state))
    return states


def fetch_with_torchvision(dataset: str, into: Path) -> None:
    import torchvision.datasets

    getattr(torchvision.datasets, dataset)(root=str(into), download=True)


def download(name: str, root: Path, console: Console) -> None:
    """Fetches the missing pieces with torchvision into a staging folder, then moves each into place."""
    spec = DOWNLOADS[name]
    todo = {source: target for source, target in spec.moves.items() if not present(root / target)}
    if not todo:
        console.print(f"{name}: the pieces torchvision provides are already in {escape(str(root))}")
        return
    staging = root.parent / f".{root.name}.download"
    shutil.rmtree(staging, ignore_errors=True)  # what an interrupted download left
    staging.mkdir(parents=True)
    try:
        console.print(
            f"downloading {name} with torchvision.datasets.{spec.dataset} into {escape(str(staging))} ..."
        )
        fetch_with_torchvision(spec.dataset, staging)
        for source, target in todo.items():
            (root / target).parent.mkdir(parents=True, exist_ok=True)
            if (root / target).is_dir():
                (root / target).rmdir()  # an empty folder is "missing"; replace it
            os.replace(staging / source, root / target)
            console.print(f"  placed {escape(target)}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def report(name: str, root: Path, console: Console) -> bool:
    """Prints the state of each piece and how to get the missing ones; True when all is there."""
    console.print(
        f"[bold]{name}[/bold]: {escape(str(root))}" + ("" if root.is_dir() else " (no such folder)")
    )
    ready = True
    for piece, state in check(name, root):
        if state == "present":
            console.print(f"  [green]✓[/green] {escape(piece.path)}: present")
        elif state == "missing":
            ready = False
            console.print(f"  [red]✗[/red] {escape(piece.path)}: missing; {escape(piece.how)}")
        else:
            console.print(f"  [yellow]-[/yellow] {escape(piece.path)}: {state}; {escape(piece.how)}")
    if not ready and name in DOWNLOADS:
        console.print(
            f"torchvision can download the images: python -m src.data.prepare {name} "
            f"--data-dir {escape(str(root.parent))} --download"
        )
    if not ready:
        console.print(f"the reference's guide: {GUIDE_URL}")
    return ready


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m src.data.prepare",
        description="Check a dataset folder of $DATA and say how to get what is missing.",
    )
    parser.add_argument("name", choices=sorted(GUIDE), help="the dataset (conf/dataset/NAME.yaml)")
    parser.add_argument(
        "--data-dir", default=os.environ.get("DATA", "data"), help="$DATA (default: $DATA or data)"
    )
    parser.add_argument(
        "--download", action="store_true", help="fetch the images with torchvision where it has a downloader"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # e.g. "made the split file ..."
    console = Console(soft_wrap=True, highlight=False)  # no wrapping: URLs stay whole and copyable
    reader = dataset_reader(args.name, args.data_dir)
    if args.download:
        if args.name in DOWNLOADS:
            download(args.name, reader.root, console)
        else:
            console.print(f"torchvision has no downloader for {args.name}: get the pieces as listed below")
    if not report(args.name, reader.root, console):
        return 1
    try:
        splits = reader.read()
    except DatasetError as err:
        console.print(f"[red]{escape(str(err))}[/red]")
        return 1
    console.print(
        f"ready: {len(splits.train)} train, {len(splits.val)} val, {len(splits.test)} test images, "
        f"{len(splits.classnames)} classes"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The 15 datasets of the paper in the reference's layouts, custom data without code, the split
files made when absent, the saved few-shot lists, and the one-line errors of bad data."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException, MissingConfigException
from hydra.utils import instantiate

from src.data.datamodule import FewShotDataModule
from src.data.datasets import base
from src.data.datasets.base import DatasetError, DatasetReader
from src.data.datasets.csv_lists import CsvLists
from src.data.datasets.folder import Folder
from src.data.datasets.oxford_pets import OxfordPets
from src.run.training import train
from tests.conftest import make_cfg
from tests.miniature import LAYOUTS, WNIDS, make_all, make_oxford_pets, write_image

SHARKS = list(WNIDS.values())
# name -> (folder under $DATA as in the reference's guide, class names, (train, val, test) sizes)
EXPECTED = {
    "imagenet": ("imagenet", SHARKS[:4], (12, 8, 8)),
    "caltech101": ("caltech-101", ["face", "accordion", "airplane"], (6, 3, 6)),
    "oxford_pets": (
        "oxford_pets",
        ["abyssinian", "american_bulldog", "basset_hound", "bengal"],
        (40, 12, 16),
    ),
    "stanford_cars": (
        "stanford_cars",
        ["2000 AM General Hummer SUV", "2012 Acura RL Sedan", "2012 Tesla Model S Sedan"],
        (12, 3, 6),
    ),
    "oxford_flowers": (
        "oxford_flowers",
        ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"],
        (6, 3, 6),
    ),
    "food101": ("food-101", ["apple_pie", "baby_back_ribs", "baklava"], (6, 3, 6)),
    "fgvc_aircraft": ("fgvc_aircraft", ["707-320", "A300B4", "Cessna 172"], (9, 3, 6)),
    "sun397": ("sun397", ["abbey", "shop bakery", "outdoor outhouse"], (12, 3, 6)),
    "dtd": ("dtd", ["banded", "blotchy", "braided"], (6, 3, 6)),
    "eurosat": ("eurosat", ["Annual Crop Land", "Forest", "Sea or Lake"], (6, 3, 6)),
    "ucf101": ("ucf101", ["Apply_Eye_Makeup", "Basketball", "Yo_Yo"], (12, 3, 6)),
    "imagenetv2": ("imagenetv2", SHARKS, (0, 0, 12)),
    "imagenet_sketch": ("imagenet-sketch", SHARKS, (0, 0, 12)),
    "imagenet_a": ("imagenet-adversarial", SHARKS[1::2], (0, 0, 6)),
    "imagenet_r": ("imagenet-rendition", SHARKS[0::2], (0, 0, 6)),
}
TRAIN_SETS = [name for name, (_, _, sizes) in EXPECTED.items() if sizes[0]]
TEST_ONLY = [name for name in EXPECTED if name not in TRAIN_SETS]
# made from official train(val)/test lists: the test split is the official one, whatever the seed
OFFICIAL_TEST = {"oxford_pets", "stanford_cars", "sun397", "ucf101"}
SPLIT_FILE_SETS = [
    "caltech101",
    "oxford_pets",
    "stanford_cars",
    "oxford_flowers",
    "food101",
    "sun397",
    "dtd",
    "eurosat",
    "ucf101",
]


@pytest.fixture(scope="module")
def reference_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """$DATA with a miniature of every dataset (read only by the tests: they copy what they change)."""
    return make_all(tmp_path_factory.mktemp("reference"))


def reader_for(name: str, data_dir: Path, tmp_path: Path) -> DatasetReader:
    """The reader `python -m src.train dataset=NAME paths.data_dir=...` builds."""
    overrides = [f"dataset={name}", f"paths.data_dir={data_dir}", f"paths.cache_dir={tmp_path / 'cache'}"]
    return instantiate(make_cfg(overrides, tmp_path).dataset.reader)


def datamodule(reader: DatasetReader, **kwargs) -> FewShotDataModule:
    return FewShotDataModule(reader, **{"shots": 1, "seed": 1, "image_size": 32, "num_workers": 0, **kwargs})


@pytest.mark.parametrize("name", list(EXPECTED))
def test_reader_reads_the_reference_layout(name, reference_data, tmp_path):
    folder, classnames, sizes = EXPECTED[name]
    reader = reader_for(name, reference_data, tmp_path)
    assert reader.root == reference_data / folder
    splits = reader.read()
    assert splits.classnames == classnames
    assert (len(splits.train), len(splits.val), len(splits.test)) == sizes
    for item in splits.train + splits.val + splits.test:
        assert Path(item.path).is_file() and splits.classnames[item.label] == item.classname
    assert {item.label for item in splits.test} == set(range(len(classnames)))
    if name == "imagenet":
        assert splits.val == splits.test  # as in the reference: ImageNet validates on its test set


@pytest.mark.parametrize("name", TRAIN_SETS)
def test_one_epoch_of_training_on_each_dataset(name, reference_data, tiny_overrides, tmp_path):
    """python -m src.train model=tiny dataset=NAME paths.data_dir=<miniature> shots=1 trainer.max_epochs=1"""
    _, classnames, (_, _, n_test) = EXPECTED[name]
    overrides = [*tiny_overrides, f"paths.data_dir={reference_data}", f"dataset={name}", "shots=1"]
    results = train(make_cfg([*overrides, "trainer.max_epochs=1"], tmp_path))
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert results["num_classes"] == len(classnames) and results["num_train"] == len(classnames)
    assert results["num_test"] == n_test and 0 <= results["test_acc"] <= 100
    chosen = json.loads((tmp_path / "fewshot.json").read_text())
    assert sorted(label for _, label, _ in chosen["train"]) == list(range(len(classnames)))
    assert all(not Path(rel).is_absolute() for rel, _, _ in chosen["train"] + chosen["val"])


@pytest.mark.parametrize("name", TEST_ONLY)
def test_test_only_sets_give_their_test_loader_and_refuse_training(name, reference_data, tmp_path):
    _, classnames, (_, _, n_test) = EXPECTED[name]
    dm = datamodule(reader_for(name, reference_data, tmp_path))
    dm.setup("test")
    assert dm.train_items == [] and dm.val_items == [] and dm.classnames == classnames
    images, labels = zip(*dm.test_dataloader(), strict=True)
    assert torch.cat(images).shape == (n_test, 3, 32, 32)
    assert torch.cat(labels).tolist() == [item.label for item in dm.test_items]
    with pytest.raises(DatasetError, match="no training images \\(a test-only dataset\\)"):
        dm.setup("fit")


def test_imagenet_variants_keep_imagenet_names(reference_data, tmp_path):
    """imagenetv2 folder i is line i of classnames.txt; -A and -R relabel the wnids present."""
    v2 = reader_for("imagenetv2", reference_data, tmp_path).read()
    assert [Path(item.path).parent.name for item in v2.test if item.label == 3] == ["3", "3"]
    a = reader_for("imagenet_a", reference_data, tmp_path).read()
    assert {Path(item.path).parent.name: item.label for item in a.test} == {
        "n01443537": 0,
        "n01491361": 1,
        "n01496331": 2,
    }
    assert (reference_data / "imagenet-adversarial" / "imagenet-a" / "README.txt").is_file()


@pytest.mark.parametrize("name", SPLIT_FILE_SETS)
def test_missing_split_file_is_made_like_the_reference_and_saved(name, tmp_path, caplog):
    data = tmp_path / "data"
    root = LAYOUTS[name](data)
    reader = reader_for(name, data, tmp_path)
    official = reader.read()
    (root / reader.split_file).unlink()

    def fresh() -> DatasetReader:
        return type(reader)(root, cache_dir=reader.cache_dir)

    with caplog.at_level(logging.WARNING):
        made = fresh().read()
    assert f"has no {reader.split_file}: made one as the reference does" in caplog.text
    assert made.classnames == official.classnames
    assert (len(made.train), len(made.val), len(made.test)) == EXPECTED[name][2]
    everything = sorted(official.train + official.val + official.test)
    assert sorted(made.train + made.val + made.test) == everything
    if name in OFFICIAL_TEST:
        assert sorted(made.test) == sorted(official.test)
    text = (root / reader.split_file).read_text()
    assert not list(root.glob(".*.tmp"))  # written through a temporary file, renamed
    assert fresh().read() == made  # later runs read the saved file
    (root / reader.split_file).unlink()
    fresh().read()
    assert (root / reader.split_file).read_text() == text  # deterministic


def test_split_goes_to_the_cache_folder_when_the_data_folder_is_read_only(tmp_path, monkeypatch, caplog):
    root = make_oxford_pets(tmp_path / "data")
    (root / "split_zhou_OxfordPets.json").unlink()
    real_write = base.write_json

    def read_only_data(path, data):
        if Path(path).is_relative_to(root):
            raise PermissionError(13, "Read-only file system", str(path))
        return real_write(path, data)

    monkeypatch.setattr(base, "write_json", read_only_data)
    reader = OxfordPets(root, cache_dir=tmp_path / "cache")
    with caplog.at_level(logging.INFO):
        made = reader.read()
    assert not (root / "split_zhou_OxfordPets.json").exists()
    assert reader.cached_split_file.is_file() and reader.cached_split_file.is_relative_to(tmp_path / "cache")
    assert "is not writable" in caplog.text and str(reader.cached_split_file) in caplog.text

    def no_remake(self):
        raise AssertionError("the cached split should have been read")

    monkeypatch.setattr(OxfordPets, "make_split", no_remake)
    assert OxfordPets(root, cache_dir=tmp_path / "cache").read() == made


def test_fewshot_list_is_saved_and_given_back(data_dir, tmp_path):
    saved = tmp_path / "run" / "fewshot.json"
    first = datamodule(OxfordPets(data_dir / "oxford_pets"), shots=2, save_fewshot_to=saved)
    first.setup("fit")
    rows = json.loads(saved.read_text())
    assert rows["shots"] == 2 and rows["seed"] == 1 and len(rows["train"]) == 8 and len(rows["val"]) == 8
    assert all(rel.startswith("images/") for rel, _, _ in rows["train"])
    other_seed = datamodule(OxfordPets(data_dir / "oxford_pets"), shots=2, seed=7)
    other_seed.setup("fit")
    assert other_seed.train_items != first.train_items
    # the same list on another machine: another copy of the data, another seed
    copy = tmp_path / "elsewhere" / "oxford_pets"
    shutil.copytree(data_dir / "oxford_pets", copy)
    again = datamodule(OxfordPets(copy), shots=2, seed=7, fewshot_file=str(saved))
    again.setup("fit")
    assert [Path(s.path).relative_to(copy) for s in again.train_items] == [
        Path(s.path).relative_to(data_dir / "oxford_pets") for s in first.train_items
    ]
    assert [s.label for s in again.val_items] == [s.label for s in first.val_items]


def test_fewshot_file_from_other_data_is_refused(data_dir, tmp_path):
    saved = tmp_path / "fewshot.json"
    saved.write_text(json.dumps({"train": [["images/Abyssinian_999.jpg", 0, "abyssinian"]], "val": []}))
    dm = datamodule(OxfordPets(data_dir / "oxford_pets"), fewshot_file=str(saved))
    with pytest.raises(
        DatasetError, match="images/Abyssinian_999.jpg \\(label 0\\) is not in the train split"
    ):
        dm.setup("fit")


# --- errors: one line naming the path or option and the fix ---------------------------------------


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(DatasetError) as err:
        reader_for("dtd", tmp_path, tmp_path).read()
    assert f"dataset folder {tmp_path / 'dtd'} not found" in one_line(err) and "paths.data_dir" in str(
        err.value
    )


@pytest.mark.parametrize(
    "name, removed",
    [
        ("imagenet", "classnames.txt"),
        ("imagenet_a", "classnames.txt"),
        ("fgvc_aircraft", "variants.txt"),
        ("oxford_flowers", "cat_to_name.json"),
        ("stanford_cars", "devkit/cars_meta.mat"),
        ("sun397", "ClassName.txt"),
        ("ucf101", "ucfTrainTestlist/classInd.txt"),
        ("oxford_pets", "annotations/trainval.txt"),
    ],
)
def test_missing_class_name_or_label_file(name, removed, tmp_path):
    root = LAYOUTS[name](tmp_path / "data")
    (root / removed).unlink()
    reader = reader_for(name, tmp_path / "data", tmp_path)
    if getattr(reader, "split_file", ""):  # the label files matter only without the split file
        (root / reader.split_file).unlink()
    with pytest.raises(DatasetError) as err:
        reader.read()
    message = one_line(err)
    assert f"{root / removed} not found" in message and f"python -m src.data.prepare {name}" in message


def test_class_name_file_without_a_folder(tmp_path):
    root = LAYOUTS["imagenet"](tmp_path / "data")
    lines = (root / "classnames.txt").read_text().splitlines()
    (root / "classnames.txt").write_text("\n".join(lines[1:]))
    with pytest.raises(DatasetError) as err:
        reader_for("imagenet", tmp_path / "data", tmp_path).read()
    assert "has no class name for ['n01440764']" in one_line(err)


def test_split_entry_whose_image_is_absent(tmp_path):
    root = make_oxford_pets(tmp_path)
    gone = root / "images" / "Bengal_68.jpg"
    gone.unlink()
    with pytest.raises(DatasetError) as err:
        datamodule(OxfordPets(root)).setup("fit")
    assert f"{gone} not found (1 images of the split are missing)" in one_line(err)


def test_unreadable_image_fails_at_setup_or_is_skipped(tmp_path, caplog):
    root = make_oxford_pets(tmp_path)
    clean = datamodule(OxfordPets(root), shots=8)
    clean.setup("fit")
    bad_train, bad_test = clean.train_items[0].path, clean.test_items[0].path
    for path in (bad_train, bad_test):
        Path(path).write_bytes(b"not an image")
    with pytest.raises(DatasetError) as err:
        datamodule(OxfordPets(root), shots=8).setup("fit")
    assert f"{bad_train} cannot be read" in one_line(err) and "data.skip_bad_images=true" in str(err.value)
    skipping = datamodule(OxfordPets(root), shots=8, skip_bad_images=True)
    with caplog.at_level(logging.WARNING):
        skipping.setup("fit")
    assert "left out 2 unreadable images" in caplog.text
    assert bad_train not in {s.path for s in skipping.train_items}
    assert Counter(s.label for s in skipping.train_items) == {0: 8, 1: 8, 2: 8, 3: 8}  # drawn again
    assert len(skipping.test_items) == len(clean.test_items) - 1


def test_unknown_dataset_name_lists_the_known_ones(tmp_path):
    with pytest.raises(MissingConfigException) as err:
        make_cfg(["dataset=nope"], tmp_path)
    assert "dataset/nope" in str(err.value) and "oxford_pets" in str(err.value)


def test_shots_below_one(data_dir):
    with pytest.raises(ValueError, match="shots=0: the number of images per class must be at least 1"):
        datamodule(OxfordPets(data_dir / "oxford_pets"), shots=0)


def test_class_without_training_images(tmp_path):
    for split, classes in (("train", ["cat", "dog"]), ("test", ["cat", "dog", "emu"])):
        for label, name in enumerate(classes):
            for i in range(3):
                write_image(tmp_path / split / name / f"{i}.jpg", label, i)
    dm = datamodule(Folder(tmp_path))
    with pytest.raises(DatasetError) as err:
        dm.setup("fit")
    assert "no training images for classes ['emu']" in one_line(err)
    dm.setup("test")  # evaluating is fine
    assert len(dm.test_items) == 9


# --- custom data without code --------------------------------------------------------------------


def image_folder(root: Path, classes: list[str], n: int) -> Path:
    for label, name in enumerate(classes):
        for i in range(n):
            write_image(root / name / f"{name}_{i}.jpg", label, i)
    return root


def test_folder_of_class_folders_trains_with_prompt_names(tiny_overrides, tmp_path):
    root = image_folder(tmp_path / "mydata", ["blue", "green", "red"], 6)
    names = tmp_path / "names.txt"
    names.write_text("blue a blue square\ngreen a green square\nred a red square\n")
    overrides = ["dataset=folder", f"dataset.root={root}", f"dataset.classnames={names}", "shots=1"]
    results = train(make_cfg([*tiny_overrides, *overrides, "trainer.max_epochs=1"], tmp_path / "run"))
    assert results["num_classes"] == 3 and results["num_train"] == 3
    assert results["num_test"] == 6  # 6 per class: 3 train, 1 val, 2 test
    prompt = torch.load(tmp_path / "run" / "prompt.pt", weights_only=True)
    assert prompt["classnames"] == ["a blue square", "a green square", "a red square"]


def test_folder_with_split_folders_splits_off_what_is_missing(tmp_path):
    image_folder(tmp_path / "a" / "train", ["x", "y"], 5)
    image_folder(tmp_path / "a" / "test", ["x", "y"], 2)
    splits = Folder(tmp_path / "a").read()
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 2, 4)
    assert all("/test/" in s.path for s in splits.test) and all("/train/" in s.path for s in splits.val)
    image_folder(tmp_path / "b" / "train", ["x", "y"], 10)
    image_folder(tmp_path / "b" / "val", ["x", "y"], 1)
    splits = Folder(tmp_path / "b").read()
    assert (len(splits.train), len(splits.val), len(splits.test)) == (14, 2, 6)
    assert Folder(tmp_path / "b").read() == splits
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError) as err:
        Folder(tmp_path / "empty").read()
    assert "has no class folders" in one_line(err)


def test_csv_lists_train_with_paths_relative_to_the_csv(tiny_overrides, tmp_path):
    image_folder(tmp_path / "images", ["cat", "dog"], 7)
    lists = tmp_path / "lists"
    lists.mkdir()
    rows = {"train": range(5), "test": range(5, 7)}
    for split, indices in rows.items():
        lines = ["path,label"] + [f"../images/{c}/{c}_{i}.jpg,{c}" for c in ("dog", "cat") for i in indices]
        (lists / f"{split}.csv").write_text("\n".join(lines) + "\n")
    splits = CsvLists(lists / "train.csv", test=lists / "test.csv").read()
    assert splits.classnames == ["cat", "dog"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 2, 4)  # val: 20% of train
    overrides = ["dataset=csv", f"dataset.train={lists / 'train.csv'}", f"dataset.test={lists / 'test.csv'}"]
    results = train(
        make_cfg([*tiny_overrides, *overrides, "shots=1", "trainer.max_epochs=1"], tmp_path / "run")
    )
    assert results["num_classes"] == 2 and results["num_test"] == 4 and results["num_train"] == 2


def test_csv_without_the_columns(tmp_path):
    (tmp_path / "train.csv").write_text("file,class\na.jpg,cat\n")
    with pytest.raises(DatasetError) as err:
        CsvLists(tmp_path / "train.csv").read()
    assert "train.csv needs the columns path,label" in one_line(err)
    with pytest.raises(DatasetError) as err:
        CsvLists(tmp_path / "nope.csv").read()
    assert "nope.csv not found: the train CSV given as dataset.train" in one_line(err)
    for name, option in (("csv", "dataset.train"), ("folder", "dataset.root")):
        with pytest.raises(InstantiationException) as err:  # Hydra wraps the reader's error
            instantiate(make_cfg([f"dataset={name}"], tmp_path).dataset.reader)
        assert isinstance(err.value.__cause__, DatasetError)
        assert str(err.value.__cause__).startswith(f"dataset={name} needs {option}=")

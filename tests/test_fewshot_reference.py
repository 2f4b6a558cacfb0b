"""The few-shot subsets of the original code: its draw for the same seed and shots on the same split
file, its saved pickles read safely, and few-shot before the base/new subsampling."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import sys
import types
from collections import defaultdict
from pathlib import Path

import pytest
from torchvision.datasets import ImageFolder

from src.data.datamodule import FewShotDataModule
from src.data.datasets.base import DatasetError
from src.data.datasets.imagenet import ImageNet
from src.data.datasets.oxford_pets import OxfordPets
from tests.miniature import make_imagenet, make_oxford_pets

SPLIT_FILE = "split_zhou_OxfordPets.json"


@pytest.fixture(scope="module")
def shuffled_pets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The miniature pets with a split file in no sorted order, and classes of 10, 4 (= the 4 shots)
    and 2 (< the shots) training images."""
    root = make_oxford_pets(tmp_path_factory.mktemp("data"))
    split = json.loads((root / SPLIT_FILE).read_text())
    kept = {0: 10, 1: 4, 2: 10, 3: 2}
    seen: dict[int, int] = defaultdict(int)
    train = []
    for row in split["train"]:
        seen[row[1]] += 1
        if seen[row[1]] <= kept[row[1]]:
            train.append(row)
    shuffle = random.Random(0).shuffle
    shuffle(train)
    shuffle(split["val"])
    split["train"] = train
    (root / SPLIT_FILE).write_text(json.dumps(split))
    return root


def original_subsets(split_file: Path, shots: int, seed: int) -> tuple[list, list]:
    """(image, label) lists that the original code draws, written out from its description: Dassl's
    set_random_seed seeds the global `random` at start-up; generate_fewshot_dataset(train, shots)
    then generate_fewshot_dataset(val, min(shots, 4)), each grouping the list by label in order of
    first appearance and taking random.sample(items, k) of a class with at least k items, else all."""
    split = json.loads(split_file.read_text())
    saved = random.getstate()
    random.seed(seed)
    try:
        subsets = []
        for key, k in (("train", shots), ("val", min(shots, 4))):
            tracker: dict[int, list] = defaultdict(list)
            for impath, label, _ in split[key]:
                tracker[label].append((impath, label))
            subset = []
            for items in tracker.values():
                if len(items) >= k:
                    subset.extend(random.sample(items, k))
                else:
                    subset.extend(items)
            subsets.append(subset)
    finally:
        random.setstate(saved)
    return subsets[0], subsets[1]


def chosen(dm: FewShotDataModule) -> tuple[list, list]:
    images = dm.dataset.root / "images"
    return tuple(
        [(Path(item.path).relative_to(images).as_posix(), item.label) for item in items]
        for items in (dm.train_items, dm.val_items)
    )


def setup(root: Path, **kwargs) -> FewShotDataModule:
    dm = FewShotDataModule(
        OxfordPets(root), **{"shots": 1, "seed": 1, "image_size": 32, "num_workers": 0, **kwargs}
    )
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_original_images_for_every_seed_and_shots(shuffled_pets, seed):
    for shots in (1, 2, 4, 8):
        expected = original_subsets(shuffled_pets / SPLIT_FILE, shots, seed)
        assert chosen(setup(shuffled_pets, shots=shots, seed=seed)) == expected


def test_sorted_sampler_does_not_depend_on_the_list_order(shuffled_pets, tmp_path):
    ordered = tmp_path / "oxford_pets"
    shutil.copytree(shuffled_pets, ordered)
    split = json.loads((ordered / SPLIT_FILE).read_text())
    (ordered / SPLIT_FILE).write_text(json.dumps({key: sorted(rows) for key, rows in split.items()}))
    for seed in (1, 2, 3):
        by_sorted = [
            chosen(setup(root, shots=2, seed=seed, fewshot_sampler="sorted"))
            for root in (ordered, shuffled_pets)
        ]
        assert by_sorted[0] == by_sorted[1]
    # the reference sampler follows the list order, as the original code does
    assert chosen(setup(ordered, shots=2)) != chosen(setup(shuffled_pets, shots=2))
    with pytest.raises(ValueError, match="'random': use data.fewshot_sampler=reference, data.fewshot_s"):
        setup(ordered, fewshot_sampler="random")


@pytest.mark.parametrize("subsample, first", [("base", 0), ("new", 2)])
def test_fewshot_is_drawn_on_all_classes_before_subsampling(shuffled_pets, tmp_path, subsample, first):
    train, val = original_subsets(shuffled_pets / SPLIT_FILE, 2, 1)
    saved = tmp_path / "fewshot.json"
    dm = setup(shuffled_pets, shots=2, subsample=subsample, save_fewshot_to=saved)
    assert dm.classnames == OxfordPets(shuffled_pets).read().classnames[first : first + 2]

    def kept(rows: list) -> list:
        return [(image, label - first) for image, label in rows if first <= label < first + 2]

    assert chosen(dm) == (kept(train), kept(val))
    # the saved list is the draw on all classes (as the reference's pickle), replayed into the same run
    rows = json.loads(saved.read_text())
    assert [(Path(rel).name, label) for rel, label, _ in rows["train"]] == train
    assert rows["sampler"] == "reference" and rows["source"] is None
    again = setup(shuffled_pets, seed=9, subsample=subsample, fewshot_file=str(saved))
    assert chosen(again) == chosen(dm) and again.fewshot_origin == {
        "sampler": "reference",
        "source": str(saved),
    }


# --- CLIP-LoRA's draw (data.fewshot_sampler=clip_lora) -------------------------------------------


def clip_lora_subsets(split_file: Path, shots: int, seed: int) -> tuple[list, list]:
    """(image, label) lists that CLIP-LoRA's official code draws, written out from its description:
    set_random_seed seeds the global `random`; its dataset files call generate_fewshot_dataset(val,
    min(shots, 4)) first, then generate_fewshot_dataset(train, shots), each with Dassl's older
    repeat=True: random.choices(items, k) for a class of fewer than k items."""
    split = json.loads(split_file.read_text())
    saved = random.getstate()
    random.seed(seed)
    try:
        subsets = {}
        for key, k in (("val", min(shots, 4)), ("train", shots)):
            tracker: dict[int, list] = defaultdict(list)
            for impath, label, _ in split[key]:
                tracker[label].append((impath, label))
            subsets[key] = []
            for items in tracker.values():
                subsets[key] += random.sample(items, k) if len(items) >= k else random.choices(items, k=k)
    finally:
        random.setstate(saved)
    return subsets["train"], subsets["val"]


@pytest.mark.parametrize("seed", [1, 2])
def test_clip_lora_sampler_draws_as_its_official_code(shuffled_pets, seed):
    for shots in (2, 4, 8):  # class 3 has 2 training images: drawn with replacement, as the official
        expected = clip_lora_subsets(shuffled_pets / SPLIT_FILE, shots, seed)
        dm = setup(shuffled_pets, shots=shots, seed=seed, fewshot_sampler="clip_lora")
        assert chosen(dm) == expected and dm.fewshot_origin["sampler"] == "clip_lora"
    assert chosen(dm) != chosen(setup(shuffled_pets, shots=8, seed=seed))  # not CoOp's draw


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_clip_lora_sampler_on_imagenet_draws_train_and_val_from_the_train_folder(tmp_path, seed):
    """The official datasets/imagenet.py: torchvision's ImageFolder over images/train, then per class
    random.sample(items, shots + min(shots, 4)): the first shots train, the rest validate."""
    root = make_imagenet(tmp_path)
    folder = ImageFolder(root / "images" / "train")
    by_label: dict[int, list] = defaultdict(list)
    for path, label in folder.samples:
        by_label[label].append((Path(path).name, label))
    rng = random.Random(seed)  # set_random_seed(seed); nothing draws before the data
    drawn = [rng.sample(items, 2) for items in by_label.values()]
    dm = FewShotDataModule(ImageNet(root, names="openai"), shots=1, seed=seed, fewshot_sampler="clip_lora")
    dm.setup("fit")
    got = [[(Path(item.path).name, item.label) for item in items] for items in (dm.train_items, dm.val_items)]
    assert got == [[pair[0] for pair in drawn], [pair[1] for pair in drawn]]
    assert all("/images/train/" in item.path for item in dm.val_items)  # CoOp's: the test images


# --- the original's saved subsets: split_fewshot/shot_{K}-seed_{S}.pkl --------------------------


@pytest.fixture
def datum_class(monkeypatch: pytest.MonkeyPatch):
    """Pickles made as the original code makes them: Dassl's Datum from its own module (faked here,
    Dassl is not a dependency), gone again when the test reads them."""

    def pickle_with_dassl(data: dict) -> bytes:
        class Datum:  # Dassl's attributes: _impath, _label, _domain, _classname
            def __init__(self, impath: str, label: int, classname: str) -> None:
                self._impath, self._label, self._domain, self._classname = impath, label, 0, classname

        names = ["dassl", "dassl.data", "dassl.data.datasets", "dassl.data.datasets.base_dataset"]
        with monkeypatch.context() as patch:
            for name in names:
                patch.setitem(sys.modules, name, types.ModuleType(name))
            Datum.__module__, Datum.__qualname__ = names[-1], "Datum"
            sys.modules[names[-1]].Datum = Datum
            made = {key: [Datum(*row) for row in rows] for key, rows in data.items()}
            return pickle.dumps(made, protocol=pickle.HIGHEST_PROTOCOL)

    return pickle_with_dassl


def pets_with_pickle(source: Path, tmp_path: Path, content: bytes, shots: int = 2, seed: int = 1) -> Path:
    root = tmp_path / "oxford_pets"
    shutil.copytree(source, root)
    (root / "split_fewshot").mkdir()
    (root / "split_fewshot" / f"shot_{shots}-seed_{seed}.pkl").write_bytes(content)
    return root


def as_original_machine(rows: list) -> list:
    """(image, label) -> Datum arguments with the absolute path of another machine."""
    return [(f"/home/someone/DATA/oxford_pets/images/{image}", label, "breed") for image, label in rows]


def test_the_originals_pickle_is_read(shuffled_pets, tmp_path, datum_class):
    split = json.loads((shuffled_pets / SPLIT_FILE).read_text())
    last_two = {key: [] for key in ("train", "val")}
    for key in last_two:
        by_label = defaultdict(list)
        for image, label, _ in split[key]:
            by_label[label].append((image, label))
        last_two[key] = [row for rows in by_label.values() for row in rows[-2:]]
    assert last_two["train"] != original_subsets(shuffled_pets / SPLIT_FILE, 2, 1)[0]  # not a draw
    content = datum_class({key: as_original_machine(rows) for key, rows in last_two.items()})
    root = pets_with_pickle(shuffled_pets, tmp_path, content)
    saved = tmp_path / "fewshot.json"
    dm = setup(root, shots=2, save_fewshot_to=saved)
    assert chosen(dm) == (last_two["train"], last_two["val"])
    pkl = str(root / "split_fewshot" / "shot_2-seed_1.pkl")
    assert dm.fewshot_origin == {"sampler": "reference", "source": pkl}
    assert json.loads(saved.read_text())["source"] == pkl
    # only the reference sampler reads it; another seed or shots has no pickle
    assert chosen(setup(root, shots=2, fewshot_sampler="sorted")) != chosen(dm)
    assert chosen(setup(root, shots=2, seed=2)) == original_subsets(root / SPLIT_FILE, 2, 2)


def test_a_pickle_without_val_gets_the_val_draw(shuffled_pets, tmp_path, datum_class):
    """ImageNet's pickles have no val list (the reference validates on the test set)."""
    rows = json.loads((shuffled_pets / SPLIT_FILE).read_text())["train"]
    train = list({label: (image, label) for image, label, _ in reversed(rows)}.values())  # 1 per class
    root = pets_with_pickle(shuffled_pets, tmp_path, datum_class({"train": as_original_machine(train)}))
    drawn_train, drawn_val = original_subsets(root / SPLIT_FILE, 2, 1)
    # an unreadable image of the train draw that the pickle replaces is never opened
    unused = next(image for image, label in drawn_train if (image, label) not in train + drawn_val)
    (root / "images" / unused).write_bytes(b"not an image")
    dm = setup(root, shots=2)
    assert chosen(dm) == (train, drawn_val)


def test_a_pickle_of_other_data_is_refused(shuffled_pets, tmp_path, datum_class):
    image, label, _ = json.loads((shuffled_pets / SPLIT_FILE).read_text())["train"][0]
    other = (label + 3) % 4
    cases = [
        (
            ("Nothing_1.jpg", label),
            "/home/someone/DATA/oxford_pets/images/Nothing_1.jpg is not in the train split",
        ),
        ((image, other), f"has label {other} there and {label} in the split"),
    ]
    for number, (row, message) in enumerate(cases):
        content = datum_class({"train": as_original_machine([row])})
        root = pets_with_pickle(shuffled_pets, tmp_path / str(number), content)
        with pytest.raises(DatasetError, match="shot_2-seed_1.pkl: ") as err:
            setup(root, shots=2)
        assert message in str(err.value) and "move it out of split_fewshot/" in str(err.value)
        assert "\n" not in str(err.value)


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused(shuffled_pets, tmp_path):
    marker = tmp_path / "ran"
    root = pets_with_pickle(shuffled_pets, tmp_path, pickle.dumps({"train": [Exploit(marker)]}))
    with pytest.raises(DatasetError, match="refused to load posix.system: only Dassl's Datum is allowed"):
        setup(root, shots=2)
    assert not marker.exists()

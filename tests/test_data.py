"""Few-shot sampling, the paper's transforms, and the DataModule on the reference layout."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from torchvision import transforms as T

from src.data.datamodule import FewShotDataModule
from src.data.datasets.base import DatasetError
from src.data.datasets.oxford_pets import OxfordPets
from src.data.datasets.textile import Textile
from src.data.fewshot import few_shot
from src.data.samples import Sample
from src.data.transforms import eval_transform, train_transform


def items(counts: dict[int, int]) -> list[Sample]:
    return [Sample(f"/d/{c}_{i}.jpg", c, str(c)) for c, n in counts.items() for i in range(n)]


def test_k_per_class_or_all_when_fewer():
    chosen = few_shot(items({0: 20, 1: 3, 2: 8}), shots=4, seed=1)
    assert Counter(s.label for s in chosen) == {0: 4, 1: 3, 2: 4}


def test_subset_is_a_pure_function_of_contents_shots_and_seed():
    data = items({0: 30, 1: 30})
    a = few_shot(data, 8, seed=1)
    assert few_shot(list(reversed(data)), 8, seed=1) == a
    assert few_shot(data, 8, seed=2) != a
    assert few_shot(data, 8, seed=1) == a


def test_shots_below_one_are_refused():
    with pytest.raises(ValueError, match="shots=0"):
        few_shot(items({0: 3}), 0, seed=1)


def eval_transforms_are_the_papers():
    train = train_transform(224).transforms
    crop = next(t for t in train if isinstance(t, T.RandomResizedCrop))
    assert crop.size == (224, 224) and crop.scale == (0.08, 1.0)
    assert crop.interpolation == T.InterpolationMode.BICUBIC
    assert any(isinstance(t, T.RandomHorizontalFlip) for t in train)
    test = eval_transform(224).transforms
    resize = next(t for t in test if isinstance(t, T.Resize))
    assert resize.size == 224 and resize.interpolation == T.InterpolationMode.BICUBIC
    norm = test[-1]
    assert norm.mean == (0.48145466, 0.4578275, 0.40821073)
    assert norm.std == (0.26862954, 0.26130258, 0.27577711)


def test_oxford_pets_reference_layout(data_dir):
    splits = OxfordPets(data_dir / "oxford_pets").read()
    assert splits.classnames == ["abyssinian", "american_bulldog", "basset_hound", "bengal"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 12, 16)
    dm = FewShotDataModule(
        OxfordPets(data_dir / "oxford_pets"), shots=8, seed=1, image_size=32, num_workers=0
    )
    dm.setup("fit")
    assert Counter(s.label for s in dm.train_items) == {0: 8, 1: 8, 2: 8, 3: 8}
    assert Counter(s.label for s in dm.val_items) == {0: 3, 1: 3, 2: 3, 3: 3}  # min(8, 4) > 3 present
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (32, 3, 32, 32) and labels.dtype == torch.long
    assert len(dm.train_dataloader()) == 1  # 32 images, batch 32, drop_last
    test_images, _ = next(iter(dm.test_dataloader()))
    assert test_images.shape == (16, 3, 32, 32)


def test_small_train_set_keeps_its_last_batch(data_dir):
    dm = FewShotDataModule(
        OxfordPets(data_dir / "oxford_pets"), shots=2, seed=1, image_size=32, num_workers=0
    )
    dm.setup("fit")
    assert len(dm.train_items) == 8 and len(dm.train_dataloader()) == 1


def test_textile_split_is_deterministic_with_descriptive_names():
    splits = Textile().read()
    assert splits.classnames == [
        "fabric with a global defect",
        "fabric with a local defect",
        "flawless fabric",
    ]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1000, 400, 600)
    assert Textile().read().test == splits.test
    assert not {s.path for s in splits.train} & {s.path for s in splits.test}


def test_missing_folder_split_file_and_images(tmp_path, data_dir):
    with pytest.raises(DatasetError, match="paths.data_dir"):
        OxfordPets(tmp_path / "oxford_pets").read()
    (tmp_path / "oxford_pets").mkdir()
    with pytest.raises(DatasetError, match="annotations/trainval.txt not found"):  # no split file either
        OxfordPets(tmp_path / "oxford_pets").read()
    root = tmp_path / "oxford_pets"
    split = json.loads((data_dir / "oxford_pets" / "split_zhou_OxfordPets.json").read_text())
    (root / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    dm = FewShotDataModule(OxfordPets(root), shots=1, seed=1, num_workers=0)
    with pytest.raises(DatasetError, match="images of the split are missing"):
        dm.setup("fit")

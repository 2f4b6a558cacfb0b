"""Few-shot train images kept decoded in memory: the same augmentation as reading the files every
epoch (bit for bit on the CPU; the same crops and flips, and pixels within a few 8-bit levels,
when it ends on the device), and training runs that give the same context either way."""

from __future__ import annotations

from pathlib import Path

import conformal_clip_data
import pytest
import torch
from open_clip import OPENAI_DATASET_STD
from PIL import Image

from src.data.in_memory import (
    InMemoryTrainImages,
    collate_crops,
    collate_images,
    finish_augmentation,
    fits_in_memory,
)
from src.data.samples import Sample
from src.data.transforms import train_transform
from src.run.training import train
from tests.conftest import make_cfg

SIZE = 64
# the paper's augmentation, and the digits' (large crops, no flip: conf/dataset/digits.yaml)
AUGMENTATIONS = pytest.mark.parametrize("crop_scale, hflip", [((0.08, 1.0), True), ((0.5, 1.0), False)])


@pytest.fixture(scope="module")
def photos() -> list[Sample]:
    paths = sorted(Path(conformal_clip_data.nominal_dir()).glob("*.jpg"))[:6]
    return [Sample(str(path), i % 2, "fabric") for i, path in enumerate(paths)]


def from_files(
    items: list[Sample], seed: int, crop_scale: tuple[float, float] = (0.08, 1.0), hflip: bool = True
) -> torch.Tensor:
    """The train transform on each file, as the loader without memory applies it."""
    torch.manual_seed(seed)
    transform = train_transform(SIZE, crop_scale, hflip)
    out = []
    for item in items:
        with Image.open(item.path) as image:
            out.append(transform(image))
    return torch.stack(out)


@AUGMENTATIONS
def test_in_memory_images_augment_bit_for_bit_as_the_files(photos, crop_scale, hflip):
    data = InMemoryTrainImages(photos, SIZE, "pil", crop_scale, hflip)
    for seed in (0, 1):
        torch.manual_seed(seed)
        images, labels = collate_images([data[i] for i in range(len(data))])
        assert torch.equal(images, from_files(photos, seed, crop_scale, hflip))
    assert labels.tolist() == [0, 1, 0, 1, 0, 1]


@AUGMENTATIONS
def test_augmentation_on_the_device_draws_the_same_crops_and_flips(photos, crop_scale, hflip):
    data = InMemoryTrainImages(photos, SIZE, "device", crop_scale, hflip)
    differences, flips = [], []
    for seed in range(4):
        torch.manual_seed(seed)
        batch = collate_crops([data[i] for i in range(len(data))])
        images, labels = finish_augmentation(batch, SIZE)
        assert images.shape == (len(photos), 3, SIZE, SIZE) and labels.tolist() == [0, 1, 0, 1, 0, 1]
        std = torch.tensor(OPENAI_DATASET_STD)[:, None, None]
        expected = from_files(photos, seed, crop_scale, hflip)
        differences.append(((images - expected) * std * 255).abs())  # in 8-bit levels
        flips.append(batch.flips)
    assert torch.cat(flips).any() == hflip  # 24 draws: some flipped with hflip, none without
    levels = torch.stack(differences)
    # same boxes and flips: a wrong box or flip would differ by tens of levels everywhere
    assert levels.mean() < 0.5 and levels.quantile(0.99) <= 2.0 and levels.max() <= 12


def test_only_few_shot_sets_within_the_memory_budget_are_kept(photos):
    assert fits_in_memory(photos, n_classes=2, max_gb=1)
    assert not fits_in_memory(photos, n_classes=2, max_gb=1e-6)
    assert not fits_in_memory(photos * 10, n_classes=2, max_gb=1)  # 30 images per class


def test_training_from_memory_gives_the_context_of_training_from_files(tiny_overrides, tmp_path, caplog):
    args = ["dataset=oxford_pets", "shots=2", "data.batch_size=4", "trainer.max_epochs=1", *tiny_overrides]
    runs = {
        "memory": [],
        "files": ["data.train_in_memory=false"],
        "device": ["data.train_augment=device"],  # the GPU's code path, run on the CPU
    }
    ctx, logged = {}, {}
    for name, extra in runs.items():
        caplog.clear()
        with caplog.at_level("INFO", logger="src.data.in_memory"):
            train(make_cfg([*args, *extra], tmp_path / name))
        logged[name] = [r.getMessage() for r in caplog.records if r.name == "src.data.in_memory"]
        ctx[name] = torch.load(tmp_path / name / "prompt.pt", weights_only=True)["ctx"]
    assert logged == {
        "memory": ["8 training images decoded once and kept in memory (augmented: pil)"],
        "files": [],
        "device": ["8 training images decoded once and kept in memory (augmented: device)"],
    }
    assert torch.equal(ctx["memory"], ctx["files"])
    # the miniature images are plain colours: every resize of them gives the same pixels
    torch.testing.assert_close(ctx["device"], ctx["memory"], rtol=0, atol=1e-6)

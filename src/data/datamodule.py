"""The LightningDataModule: a dataset reader, k-shot sampling and the paper's transforms."""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path

import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from src.data.datasets.base import DatasetError, DatasetReader
from src.data.fewshot import few_shot
from src.data.samples import Sample, Splits
from src.data.transforms import eval_transform, train_transform

log = logging.getLogger(__name__)

VAL_SHOTS = 4  # validation keeps min(shots, 4) images per class, as the reference does


class ImageList(Dataset):
    def __init__(self, items: list[Sample], transform) -> None:
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.items[index]
        with Image.open(item.path) as image:
            return self.transform(image), item.label


class FewShotDataModule(pl.LightningDataModule):
    """k images per class from the train split (per seed), min(k, 4) from val, the full test."""

    def __init__(
        self,
        dataset: DatasetReader,
        shots: int,
        seed: int,
        image_size: int = 224,
        batch_size: int = 32,
        test_batch_size: int = 100,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
    ) -> None:
        super().__init__()
        if shots < 1:
            raise ValueError(f"shots={shots}: the number of images per class must be at least 1")
        self.dataset = dataset
        self.shots = shots
        self.seed = seed
        self.image_size = image_size
        self.batch_size = batch_size
        self.test_batch_size = test_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.persistent_workers = persistent_workers and num_workers > 0
        self.train_items: list[Sample] | None = None
        self.val_items: list[Sample] = []
        self.test_items: list[Sample] = []

    @cached_property
    def splits(self) -> Splits:
        return self.dataset.read()

    @property
    def classnames(self) -> list[str]:
        return self.splits.classnames

    def setup(self, stage: str | None = None) -> None:
        if self.train_items is not None:
            return
        splits = self.splits
        self.train_items = few_shot(splits.train, self.shots, self.seed)
        self.val_items = few_shot(splits.val, min(self.shots, VAL_SHOTS), self.seed) if splits.val else []
        self.test_items = splits.test
        missing_labels = set(range(len(splits.classnames))) - {s.label for s in self.train_items}
        if missing_labels:
            names = [splits.classnames[i] for i in sorted(missing_labels)][:5]
            raise DatasetError(
                f"{self.dataset.root}: no training images for classes {names}; "
                "add images for them or remove them from the split"
            )
        _check_exist(self.train_items + self.val_items + self.test_items)
        log.info(
            "%s: %d train (%d-shot, seed %d), %d val, %d test images, %d classes",
            self.dataset.root,
            len(self.train_items),
            self.shots,
            self.seed,
            len(self.val_items),
            len(self.test_items),
            len(splits.classnames),
        )

    def train_dataloader(self) -> DataLoader:
        items = self.train_items
        return self._loader(
            ImageList(items, train_transform(self.image_size)),
            self.batch_size,
            shuffle=True,
            # the reference drops the last partial batch only when there is a full one
            drop_last=len(items) >= self.batch_size,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(ImageList(self.val_items, eval_transform(self.image_size)), self.test_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(ImageList(self.test_items, eval_transform(self.image_size)), self.test_batch_size)

    def _loader(
        self, data: Dataset, batch_size: int, shuffle: bool = False, drop_last: bool = False
    ) -> DataLoader:
        return DataLoader(
            data,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )


def _check_exist(items: list[Sample]) -> None:
    missing = [item.path for item in items if not Path(item.path).is_file()]
    if missing:
        raise DatasetError(
            f"{missing[0]} not found ({len(missing)} images of the split are missing): "
            "restore the images or regenerate the split file"
        )

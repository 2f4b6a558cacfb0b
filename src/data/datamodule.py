"""The LightningDataModule: a dataset reader, k-shot sampling and the paper's transforms."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset
from torchvision.transforms import Compose

from src.common.messages import one_of
from src.data.datasets.base import DatasetError, DatasetReader
from src.data.feature_cache import (
    FeatureCache,
    ImageEncoder,
    RandomView,
    SeededViews,
    extract_features,
    feature_key,
    image_stamp,
)
from src.data.fewshot import (
    SAMPLERS,
    FewShotSampler,
    check_record,
    draw_fewshot,
    load_fewshot,
    save_fewshot,
)
from src.data.image_check import ImageCheck
from src.data.in_memory import (
    CropBatch,
    InMemoryTrainImages,
    collate_crops,
    collate_images,
    finish_augmentation,
    fits_in_memory,
)
from src.data.label_noise import check_rate, flip_labels, record_in_fewshot_file
from src.data.reference_fewshot import read_reference_fewshot, reference_fewshot_file
from src.data.samples import Sample, Splits
from src.data.subsample import Subsample, subsample_classes
from src.data.transforms import PAPER_CROP_SCALE, describe, eval_transform, train_transform

log = logging.getLogger(__name__)


class ImageList(Dataset):
    def __init__(self, items: list[Sample], transform) -> None:
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.items[index]
        try:
            with Image.open(item.path) as image:
                return self.transform(image), item.label
        except OSError as err:  # e.g. a truncated file whose header looked fine at setup
            raise DatasetError(f"{item.path} cannot be read ({err}): replace or remove it") from err


class FewShotDataModule(pl.LightningDataModule):
    """k images per class from the train split (per seed), min(k, 4) from val, the full test.

    With `cache_features`, validation and test batches are the frozen backbone's image features
    (computed once, then read from the feature cache) instead of images; with `train_views=K`,
    training batches too, each image drawn as one of K pre-computed augmented views. The method
    modules take either kind of batch.

    The few-shot subsets are drawn over all classes by `fewshot_sampler` (`reference`: the original
    code's draw; `sorted`: independent of list order; `clip_lora`: CLIP-LoRA's official draw), then
    `subsample` keeps the base or new classes, as the reference does. With the `reference` sampler,
    the reference's own saved subsets (`split_fewshot/shot_{K}-seed_{S}.pkl` in the dataset folder)
    are used when present. The subsets are saved (`save_fewshot_to`) and can be given back
    (`fewshot_file`) to rerun on exactly the same images. Unreadable images stop `setup` with their
    path, or with `skip_bad_images` are left out and counted.
    """

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
        subsample: Subsample = "all",
        cache_features: bool = True,
        cache_dir: str | Path | None = None,
        train_views: int = 0,
        crop_scale: tuple[float, float] = PAPER_CROP_SCALE,
        hflip: bool = True,
        skip_bad_images: bool = False,
        fewshot_file: str | Path | None = None,
        save_fewshot_to: str | Path | None = None,
        fewshot_sampler: FewShotSampler = "reference",
        train_in_memory: bool = True,
        train_augment: str = "auto",
        in_memory_max_gb: float = 16.0,
        label_noise: float = 0.0,
        test_transform: Callable[[int], Callable] | None = None,
        drop_last: bool | None = None,
    ) -> None:
        """`test_transform`: makes the test images' transform from the image size, instead of the
        eval transform (test-time prompt tuning: augmented views of each image). `drop_last`:
        whether each epoch drops its last partial train batch; None: the reference's rule."""
        super().__init__()
        if shots < 1:
            raise ValueError(f"shots={shots}: the number of images per class must be at least 1")
        if fewshot_sampler not in SAMPLERS:
            raise ValueError(one_of("data.fewshot_sampler", fewshot_sampler, SAMPLERS))
        check_rate(label_noise)
        self.dataset = dataset
        self.shots = shots
        self.seed = seed
        self.image_size = image_size
        self.batch_size = batch_size
        self.test_batch_size = test_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.persistent_workers = persistent_workers and num_workers > 0
        self.subsample = subsample
        self.cache = FeatureCache(cache_dir) if cache_features and cache_dir else None
        if train_views < 0:
            raise ValueError(f"data.train_views={train_views}: use 0 (augment on the fly) or K >= 1 views")
        self.train_views = train_views
        self.crop_scale = tuple(crop_scale)
        self.hflip = hflip
        self.skip_bad_images = skip_bad_images
        self.fewshot_file = fewshot_file
        self.save_fewshot_to = save_fewshot_to
        self.fewshot_sampler = fewshot_sampler
        # how the subsets were made: the sampler that drew them, the file they were read from
        self.fewshot_origin: dict[str, str | None] = {"sampler": None, "source": None}
        if train_augment not in ("auto", "pil", "device"):
            raise ValueError(one_of("data.train_augment", train_augment, ("auto", "pil", "device")))
        self.train_in_memory = train_in_memory
        self.train_augment = train_augment
        self.in_memory_max_gb = in_memory_max_gb
        self.label_noise = label_noise
        self.flipped: list[tuple[Sample, int]] = []  # (clean item, noisy label) of the noisy labels
        self.test_transform = test_transform
        self.drop_last = drop_last
        self.train_items: list[Sample] | None = None  # None until `select`
        self.val_items: list[Sample] = []
        self.test_items: list[Sample] = []
        self._drawn: tuple[list[Sample], list[Sample]] = ([], [])
        self._published = False
        self.encoder: ImageEncoder | None = None  # handed by the run (`use_encoder`)

    def use_encoder(self, encoder: ImageEncoder) -> None:
        """The frozen image encoder whose features the loaders give (cached features, cached train
        views) and the device and precision it runs at; its input size is the images'."""
        self.encoder = encoder
        self.image_size = encoder.image_size

    @cached_property
    def all_splits(self) -> Splits:
        """The dataset's splits on all classes, in the reader's list order."""
        return self.dataset.read()

    @cached_property
    def splits(self) -> Splits:
        return subsample_classes(self.all_splits, self.subsample)

    @property
    def classnames(self) -> list[str]:
        return self.splits.classnames

    def setup(self, stage: str | None = None) -> None:
        self.select()
        if not self._published:
            self._publish()
        if stage in (None, "fit"):
            self.require_training_images()

    def select(self) -> None:
        """The few-shot train/val subsets (the given `fewshot_file`, the reference's pickle, or drawn)
        over all classes, then subsampled, and the test split, with every image checked and the
        label noise applied; once. Writes nothing (src.train runs it before claiming the run
        folder); `setup` then saves the subsets to `save_fewshot_to`."""
        if self.train_items is not None:
            return
        splits, everything = self.splits, self.all_splits
        check_distinct_classnames(splits.classnames, self.dataset.root, self.dataset.repeated_names)
        check = ImageCheck(skip_bad=self.skip_bad_images)
        pickled = reference_fewshot_file(self.dataset.root, self.shots, self.seed)
        if self.fewshot_file:
            train, val, sampler = load_fewshot(self.fewshot_file, self.dataset.root, everything)
            origin = {"sampler": sampler, "source": str(self.fewshot_file)}
            train, val = check.keep_good(train), check.keep_good(val)
        elif self.fewshot_sampler == "reference" and pickled.is_file():
            train, val = read_reference_fewshot(pickled, self.dataset.root, everything)
            if val is None:  # ImageNet: the reference has no val draw; ours, as if drawn here
                val = self._draw(everything, check, check_train=False)[1]
            origin = {"sampler": "reference", "source": str(pickled)}
            train, val = check.keep_good(train), check.keep_good(val)
        else:
            train, val = self._draw(everything, check)
            origin = {"sampler": self.fewshot_sampler, "source": None}
        subsets = subsample_classes(Splits(train, val, [], everything.classnames), self.subsample)
        test_items = check.keep_good(splits.test)
        check.report()
        if not test_items:  # before any training: every run ends with the test
            skipped = " (all skipped as unreadable: data.skip_bad_images=true)" if splits.test else ""
            raise DatasetError(
                f"{self.dataset.root}: no test images{skipped}; check the split's test list and its images"
            )
        train_items, flipped = subsets.train, []
        if self.label_noise and train_items:
            # after sampling: the images drawn are those of the clean run (src/data/label_noise.py)
            train_items, flipped = flip_labels(train_items, self.label_noise, self.seed, self.classnames)
        self._drawn = (train, val)  # what the saved list holds: the draw over all classes, clean
        self.fewshot_origin, self.val_items, self.test_items = origin, subsets.val, test_items
        self.train_items, self.flipped = train_items, flipped

    def _publish(self) -> None:
        """Saves the subsets to `save_fewshot_to` (the noisy labels added to the clean list) and
        logs where they come from."""
        origin = self.fewshot_origin
        if origin["source"]:
            log.info("few-shot subsets from %s", origin["source"])
        if self.save_fewshot_to and self.train_items:
            path = save_fewshot(
                self.save_fewshot_to, self.dataset.root, *self._drawn, self.shots, self.seed, **origin
            )
            log.info("few-shot subsets saved to %s (rerun on them with data.fewshot_file=%s)", path, path)
            if self.label_noise:
                root = self.dataset.root
                record_in_fewshot_file(self.save_fewshot_to, self.label_noise, self.flipped, root)
        if self.label_noise and self.train_items:
            flipped, total = len(self.flipped), len(self.train_items)
            log.info("label noise %g: %d of %d train labels flipped", self.label_noise, flipped, total)
        log.info(
            "%s: %d train (%d-shot, seed %d, %s sampler), %d val, %d test images, %d classes",
            self.dataset.root,
            len(self.train_items),
            self.shots,
            self.seed,
            origin["sampler"] or "unknown",
            len(self.val_items),
            len(self.test_items),
            len(self.classnames),
        )
        self._published = True

    def _draw(
        self, splits: Splits, check: ImageCheck, check_train: bool = True
    ) -> tuple[list[Sample], list[Sample]]:
        """The sampler's train and val subsets of the readable images: an unreadable image drawn
        (and skipped) is treated as absent from the split, so its class still gets `shots` images
        when it has them; both are drawn again, since the reference's val draw continues the
        random stream of its train draw. `check_train=False`: the train subset comes from elsewhere
        and only the val subset's images are opened."""
        bad: set[str] = set()
        while True:
            train, val = draw_fewshot(
                [item for item in splits.train if item.path not in bad],
                [item for item in splits.val if item.path not in bad],
                self.shots,
                self.seed,
                self.fewshot_sampler,
                val_is_test=self.dataset.val_is_test,
            )
            chosen = train + val if check_train else val
            good = check.keep_good(chosen)
            if len(good) == len(chosen):
                return train, val
            bad |= {item.path for item in chosen} - {item.path for item in good}

    def check_resumed(self) -> None:
        """For a run that continues from a checkpoint: its few-shot images are still the ones its
        fewshot.json (`save_fewshot_to`) recorded when it started (`fewshot.check_record`)."""
        self.select()
        if self.save_fewshot_to and Path(self.save_fewshot_to).is_file():
            check_record(Path(self.save_fewshot_to), self.dataset.root, *self._drawn)

    def require_training_images(self) -> None:
        """A method that trains needs training images of every class."""
        splits = self.splits
        if not splits.train:
            raise DatasetError(
                f"{self.dataset.root} has no training images (a test-only dataset): train on another "
                "dataset and evaluate the prompt on this one (python -m src.eval ckpt=... dataset=...)"
            )
        missing_labels = set(range(len(splits.classnames))) - {s.label for s in self.train_items}
        if missing_labels:
            names = [splits.classnames[i] for i in sorted(missing_labels)][:5]
            raise DatasetError(
                f"{self.dataset.root}: no training images for classes {names}; "
                "add images for them or remove them from the split"
            )

    def train_dataloader(self) -> DataLoader:
        return self.train_loader(self.train_data())

    def train_data(self) -> Dataset:
        """The train set as its loader reads it: K cached views per image, the images decoded in
        memory (when they take at most `data.in_memory_max_gb`), or the files. Runs trained together
        share it when their images are the same (src/packing/train.py)."""
        items = self.train_items
        if self.train_views:
            features, labels = self.image_features("train", views=self.train_views)
            return RandomView(features.view(self.train_views, len(items), -1), labels[: len(items)])
        if self.train_in_memory and fits_in_memory(items, len(self.classnames), self.in_memory_max_gb):
            # without an encoder (a loader built by hand) batches stay on the CPU
            on_cpu = self.encoder is None or self.encoder.device().type == "cpu"
            augment = {"auto": "pil" if on_cpu else "device"}.get(self.train_augment, self.train_augment)
            return InMemoryTrainImages(items, self.image_size, augment, self.crop_scale, self.hflip)
        return ImageList(items, self.train_transform())

    def train_loader(self, data: Dataset) -> DataLoader:
        return self._loader(
            data,
            self.batch_size,
            shuffle=True,
            # the reference drops the last partial batch only when there is a full one
            drop_last=len(self.train_items) >= self.batch_size if self.drop_last is None else self.drop_last,
        )

    def train_transform(self) -> Compose:
        return train_transform(self.image_size, self.crop_scale, self.hflip)

    def describe(self) -> dict[str, str]:
        return describe(self.image_size, self.crop_scale, self.hflip)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, CropBatch):  # the in-memory train images' augmentation ends here
            return finish_augmentation(batch, self.image_size)
        return batch

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val", self.val_items)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test", self.test_items)

    def _eval_loader(self, split: str, items: list[Sample]) -> DataLoader:
        if split == "test" and self.test_transform is not None:
            data = ImageList(items, self.test_transform(self.image_size))
        elif self.cache is None:
            data = ImageList(items, eval_transform(self.image_size))
        else:
            data = TensorDataset(*self.image_features(split))
        # A generator of its own: starting a loader draws a seed from its generator, and drawing it
        # from the global one would make the training's data order and augmentations depend on
        # when (and whether) a run validates; the original code never validates.
        return self._loader(
            data,
            self.test_batch_size,
            sampler=unrepeated_sampler(data, self.trainer),
            generator=torch.Generator(),
        )

    def image_features(self, split: str, views: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen image features of a split's images ("train", "val" or "test") and their labels,
        under the eval transform or, with `views`, as `views` seeded augmentations per image under
        the train transform ([views * n, d], view-major). Read from the feature cache when it is on.

        Computed with the encoder the run handed over (`use_encoder`), on its device and under its
        precision, exactly as the batches of a test step would be.
        """
        items = {"train": self.train_items, "val": self.val_items, "test": self.test_items}[split]
        encoder = self.encoder
        if encoder is None:
            raise RuntimeError(
                "FewShotDataModule.use_encoder(...) first: image features are computed with the frozen "
                "encoder the run hands to the data module"
            )
        if views:
            data = SeededViews(items, self.train_transform(), views, self.seed)
            transform = f"{self.describe()['train']}; {views} views, seed {self.seed}"
        else:
            data = ImageList(items, eval_transform(self.image_size))
            transform = self.describe()["test"]

        def compute() -> torch.Tensor:
            return extract_features(encoder, data, self.test_batch_size, self.num_workers)

        labels = torch.tensor([item.label for item in items]).repeat(max(views, 1))
        if self.cache is None:
            return compute(), labels
        name = getattr(self.dataset, "name", "") or type(self.dataset).__name__.lower()
        key = feature_key(encoder, name, split, items, transform)
        stamp = image_stamp(items)
        # Rank 0 computes and stores first; the other ranks then read its file.
        features = self.cache.get(key, compute, stamp) if encoder.is_global_zero() else None
        encoder.barrier()
        if features is None:
            features = self.cache.get(key, compute, stamp)
        return features, labels

    def _loader(
        self,
        data: Dataset,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        sampler: Sampler | None = None,
        generator: torch.Generator | None = None,
    ) -> DataLoader:
        # in memory: no worker processes
        features = isinstance(data, (TensorDataset, RandomView, InMemoryTrainImages))
        collate = None
        if isinstance(data, InMemoryTrainImages):
            collate = collate_crops if data.augment == "device" else collate_images
        return DataLoader(
            data,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            sampler=sampler,
            num_workers=0 if features else self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and not features,
            collate_fn=collate,
            generator=generator,
        )


def check_distinct_classnames(
    classnames: list[str], root: Path | str, repeated: frozenset[str] = frozenset()
) -> None:
    """Two classes whose names become one prompt (CLIP's tokenizer lowercases and collapses spaces;
    the methods write `_` as a space) would train two labels on one text: refused, naming them.
    `repeated`: names the dataset's own list gives to several classes (OpenAI's ImageNet names),
    accepted as given and logged."""
    seen: dict[str, int] = {}
    for label, name in enumerate(classnames):
        words = " ".join(name.replace("_", " ").lower().split())
        if words in seen and name in repeated:
            log.info("classes %d and %d share the name %r in the dataset's list", seen[words], label, name)
        elif words in seen:
            other = seen[words]
            raise DatasetError(
                f"{root}: classes {classnames[other]!r} (label {other}) and {name!r} (label {label}) become "
                f"the same prompt words ({words!r}): rename one in the dataset's class list (or merge their "
                "labels)"
            )
        seen[words] = label


def unrepeated_sampler(data: Dataset, trainer: pl.Trainer | None) -> Sampler | None:
    """Under DDP, each rank evaluates its own share of the images, none of them twice.

    Lightning's default DistributedSampler pads the last share with repeated images, so that every
    rank gets as many batches, and the repeats would count twice in the accuracy. Uneven shares are
    safe in evaluation: nothing is synchronised per batch, and torchmetrics sums the ranks' counts
    once at the end. None (Lightning's default) on one device.
    """
    if trainer is None or trainer.world_size < 2:
        return None
    return UnrepeatedDistributedSampler(
        data, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
    )

"""Few-shot training images decoded once and kept in memory, augmented without loader restarts.

A few-shot train set (at most 16 images per class) is small, and a small train set makes short
epochs: reading and decoding every image again each epoch, in loader workers that start again
each epoch, then costs more than the training steps. Here the images are decoded once (in
threads: PIL releases the GIL while decoding) and the loader runs in the main process, so an epoch
starts at once. The augmentation is `train_transform`'s (the paper's, or the dataset's own crop
scale and flip), drawn per image from torch's global generator exactly as `train_transform` draws
it, so a resumed run draws the same (src/run/resume.py). Two ways to apply it:

- "pil" (the CPU's): `train_transform`'s PIL calls on the decoded image, in the loader (its crop,
  resize and flip, without torchvision's per-call overhead), and its ToTensor and Normalize
  arithmetic once per batch (`collate_images`): bit for bit the tensors of reading the file every
  epoch, at half the cost per image;
- "device" (a GPU's, where the PIL resize in one process would bound the step): the loader draws
  the same crop box and flip and cuts the crop out of the uint8 image; on the device, each crop is
  resized to the input size (bicubic, antialiased, rounded to 8 bits as PIL does), flipped and
  normalised. Same boxes and flips; the pixels are torch's bicubic filter's, within a few
  8-bit levels of PIL's (tests/test_in_memory.py).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from src.data.datasets.base import DatasetError
from src.data.samples import Sample
from src.data.transforms import PAPER_CROP_SCALE

log = logging.getLogger(__name__)

Augment = Literal["pil", "device"]
FEW_SHOT_MAX = 16  # train sets of at most 16 images per class are few-shot sets
RATIO = (3 / 4, 4 / 3)  # train_transform's RandomResizedCrop


class CropBatch(NamedTuple):
    """A training batch before its augmentation ends on the device: uint8 crops [3, h_i, w_i]."""

    crops: list[torch.Tensor]
    flips: torch.Tensor
    labels: torch.Tensor


def fits_in_memory(items: list[Sample], n_classes: int, max_gb: float) -> bool:
    """A few-shot set whose decoded RGB images take at most `max_gb` (read from image headers)."""
    if len(items) > FEW_SHOT_MAX * n_classes:
        return False

    def size(item: Sample) -> int:
        with Image.open(item.path) as image:
            return image.width * image.height * 3

    with ThreadPoolExecutor(max_workers=8) as pool:
        gigabytes = sum(pool.map(size, items)) / 2**30
    if gigabytes > max_gb:
        log.info(
            "train images read from disk every epoch: decoded they take %.1f GB, more than "
            "data.in_memory_max_gb=%s",
            gigabytes,
            max_gb,
        )
    return gigabytes <= max_gb


def _decode(item: Sample) -> Image.Image:
    try:
        with Image.open(item.path) as image:
            return image.convert("RGB")  # decodes; the file is closed after
    except OSError as err:
        raise DatasetError(f"{item.path} cannot be read ({err}): replace or remove it") from err


class InMemoryTrainImages(Dataset):
    """The train images, decoded once; item i is (augmented image, label) with `augment="pil"`,
    (uint8 crop, flip, label) with `augment="device"` (batched by `collate_crops`). `crop_scale`
    and `hflip` are the dataset's, as in `train_transform`."""

    def __init__(
        self,
        items: list[Sample],
        image_size: int,
        augment: Augment = "pil",
        crop_scale: tuple[float, float] = PAPER_CROP_SCALE,
        hflip: bool = True,
    ) -> None:
        if augment not in ("pil", "device"):
            raise ValueError(f"data.train_augment={augment!r}: use auto, pil or device")
        self.labels = [item.label for item in items]
        self.image_size = image_size
        self.augment = augment
        self.crop_scale = tuple(crop_scale)
        self.hflip = hflip
        with ThreadPoolExecutor(max_workers=8) as pool:
            images = list(pool.map(_decode, items))
        if augment == "device":
            images = [torch.from_numpy(np.array(image)).permute(2, 0, 1) for image in images]
        self.images = images
        log.info("%d training images decoded once and kept in memory (augmented: %s)", len(items), augment)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image, label = self.images[index], self.labels[index]
        # train_transform's draws, in its order: the crop box, then the flip (none without hflip)
        top, left, height, width = T.RandomResizedCrop.get_params(image, self.crop_scale, RATIO)
        flip = self.hflip and bool(torch.rand(1) < 0.5)
        if self.augment == "device":
            return image[:, top : top + height, left : left + width].contiguous(), flip, label
        # torchvision's PIL calls: crop, resize (none when the crop has the size already), flip
        crop = image.crop((left, top, left + width, top + height))
        size = (self.image_size, self.image_size)
        if crop.size != size:
            crop = crop.resize(size, Image.BICUBIC)
        if flip:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.array(crop)).permute(2, 0, 1), label


def collate_images(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [3, s, s] as a normalised batch: ToTensor's and Normalize's arithmetic, the
    same per element, once per batch."""
    images, labels = zip(*batch, strict=True)
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, -1, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, -1, 1, 1)
    return torch.stack(images).to(torch.float32).div(255).sub_(mean).div_(std), torch.tensor(labels)


def collate_crops(batch: list[tuple[torch.Tensor, bool, int]]) -> CropBatch:
    crops, flips, labels = zip(*batch, strict=True)
    return CropBatch(list(crops), torch.tensor(flips), torch.tensor(labels))


def finish_augmentation(batch: CropBatch, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize (bicubic, antialiased, rounded to 8 bits), flip and normalise the crops, where they
    are (the device): the end of `train_transform` after its random draws."""
    size = (image_size, image_size)
    resized = [
        F.interpolate(crop[None].float(), size=size, mode="bicubic", antialias=True, align_corners=False)
        for crop in batch.crops
    ]
    images = torch.cat(resized).round_().clamp_(0, 255).div_(255)
    images = torch.where(batch.flips[:, None, None, None], images.flip(-1), images)
    mean = torch.tensor(OPENAI_DATASET_MEAN, device=images.device)[:, None, None]
    std = torch.tensor(OPENAI_DATASET_STD, device=images.device)[:, None, None]
    return (images - mean) / std, batch.labels

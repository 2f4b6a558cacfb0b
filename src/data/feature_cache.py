"""Image features of the frozen backbone, computed once and reused by every later run.

The image encoder never changes, so the features of a split under a deterministic transform are
the same in every run of a sweep: zero-shot, the linear probe and the test of every CoOp run
share them. A file per key holds them; the key is everything the features depend on (the weights,
the dataset, the split, the ordered image list, the transform and input size, the precision), so a
changed part never reuses stale features.

Two things a key cannot see are checked when a file is read, and either makes the run compute the
features again, saying so in one line: images replaced in place (same paths, other pixels), by
their sizes and modification times (`image_stamp`, stored with the features: one `stat` per image,
0.14 s for 50,000 images on a local disk, measured; content hashes would read every image, minutes on a
network file system, so an image rewritten with the same size and modification time, as
`cp -p` or `rsync -t` of same-sized files can, goes unnoticed), and damaged files whose header
still reads (a SHA-256 of the features, stored in the file and checked on every read).

Files are written to a temporary name and renamed, so jobs that read and write the cache at the
same time never see a partial file; two jobs computing the same key write the same contents.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from rich.progress import track
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch.utils.data import DataLoader, Dataset

from src.common.files import WriteError, atomic_write, unwritable
from src.data.samples import Sample

log = logging.getLogger(__name__)

FORMAT = "2"  # bump when what a key means changes, so that old files are never read (2: stamp, checksum)


class FeatureCache:
    """Feature files under `root`, one per key."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def check_writable(self) -> None:
        """Before a run starts: its features are written at its test, after training."""
        reason = unwritable(self.root)
        if reason is not None:
            raise ValueError(
                f"paths.cache_dir={self.root} (the feature cache) is not writable ({reason}): set "
                "COOP_CACHE=<folder> or paths.cache_dir=<folder> to a writable folder, or "
                "data.cache_features=false to encode the images in every run"
            )

    def path(self, key: dict[str, str]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return self.root / "features" / key["dataset"] / f"{key['split']}-{digest}.safetensors"

    def load(self, key: dict[str, str], stamp: str = "") -> torch.Tensor | None:
        """The stored features of `key` whose images still have `stamp` (`image_stamp`) and whose
        bytes are the ones written; None (with a line saying why) when they must be computed."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                features = f.get_tensor("features")
        except (SafetensorError, OSError) as err:
            log.warning("unreadable feature file %s (%s): computing the features again", path, err)
            return None
        if metadata.get("sha256") != checksum(features):
            log.warning(
                "damaged feature file %s (its checksum does not match): computing the features again", path
            )
            return None
        if metadata.get("images") != stamp:
            log.warning(
                "the images of %s changed since their features were cached (their sizes or modification "
                "times): computing the features again",
                path,
            )
            return None
        return features

    def save(self, key: dict[str, str], features: torch.Tensor, stamp: str = "") -> Path:
        features = features.contiguous()
        metadata = {"key": json.dumps(key), "images": stamp, "sha256": checksum(features)}
        data = safetensors_bytes({"features": features}, metadata=metadata)
        return atomic_write(self.path(key), lambda f: f.write(data))

    def get(self, key: dict[str, str], compute: Callable[[], torch.Tensor], stamp: str = "") -> torch.Tensor:
        """The stored features of `key` (of images with `stamp`), or `compute()`'s, stored for the
        next run."""
        features = self.load(key, stamp)
        if features is None:
            features = compute()
            try:
                path = self.save(key, features, stamp)
            except WriteError as err:  # the features are computed: the run goes on without caching them
                log.warning("%s; the features are not cached, the run goes on", err)
                return features
            log.info("image features cached in %s", path)
        else:
            log.info("image features read from %s", self.path(key))
        return features


def checksum(features: torch.Tensor) -> str:
    """The SHA-256 of a tensor's bytes."""
    return hashlib.sha256(features.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def image_stamp(items: Sequence[Sample]) -> str:
    """What tells images replaced in place from the ones cached: a digest of each image's size and
    modification time (ns), in list order; a missing image counts as changed."""
    digest = hashlib.sha256()
    for item in items:
        try:
            stat = os.stat(item.path)
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(b"missing\n")
    return digest.hexdigest()


@dataclass(frozen=True)
class ImageEncoder:
    """The frozen image encoder a data module computes (and caches) image features with, and how
    it runs: handed to the data module by the run (`FewShotDataModule.use_encoder`), which holds the
    model and the trainer; the data module knows neither."""

    encode: Callable[[torch.Tensor], torch.Tensor]  # images [b, 3, h, w] on `device()` -> [b, d]
    weights: str  # what identifies its weights (the cache key's part)
    image_size: int
    precision: str  # the trainer's, as in the cache key
    forward_context: Callable[[], AbstractContextManager]  # the precision's autocast
    # Where this process runs it, asked when features are computed (under DDP a process knows its
    # device and rank once launched): its device, whether it computes and stores first, and a
    # wait for every process.
    device: Callable[[], torch.device] = lambda: torch.device("cpu")
    is_global_zero: Callable[[], bool] = lambda: True
    barrier: Callable[[], None] = lambda: None


def feature_key(
    encoder: ImageEncoder, dataset: str, split: str, items: Sequence[Sample], transform: str
) -> dict[str, str]:
    paths = hashlib.sha256("\n".join(item.path for item in items).encode()).hexdigest()
    return {
        "format": FORMAT,
        "weights": encoder.weights,
        "dataset": dataset,
        "split": split,
        "images": f"{len(items)}:{paths}",
        "transform": transform,
        "image_size": str(encoder.image_size),
        "precision": encoder.precision,
    }


class SeededViews(Dataset):
    """`views` augmentations of every image, each drawn with its own seed: the same views whatever
    the number of workers or the order of loading. Index v * n + i is view v of image i."""

    def __init__(self, items: list[Sample], transform, views: int, seed: int) -> None:
        self.items = items
        self.transform = transform
        self.views = views
        self.seed = seed

    def __len__(self) -> int:
        return self.views * len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.items[index % len(self.items)]
        with Image.open(item.path) as image, torch.random.fork_rng(devices=[]):
            # torchvision's random transforms draw from torch's global generator
            torch.manual_seed((self.seed << 32) + index)
            return self.transform(image), item.label


class RandomView(Dataset):
    """Each time an image is drawn, one of its pre-computed views at random (the fast training
    mode's stand-in for on-the-fly augmentation). `features` is [views, n, d]."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features = features
        self.labels = labels

    def __len__(self) -> int:
        return self.features.shape[1]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        view = int(torch.randint(self.features.shape[0], ()))
        return self.features[view, index], self.labels[index]


@torch.no_grad()
def extract_features(encoder: ImageEncoder, data: Dataset, batch_size: int, num_workers: int) -> torch.Tensor:
    """The frozen image features of every image of `data`, in order, as float32 on the CPU."""
    # A generator of its own: drawing the loader's seed from the global one would make a training
    # run's random stream depend on whether the features were cached or computed (src/run/resume.py).
    loader = DataLoader(
        data,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=encoder.device().type == "cuda",
        generator=torch.Generator(),
    )
    log.info("computing image features of %d images", len(data))
    features = []
    with encoder.forward_context():
        # a progress bar in a terminal only, as the trainer's (conf/trainer/default.yaml)
        for images, _ in track(loader, description="image features", disable=not sys.stdout.isatty()):
            features.append(encoder.encode(images.to(encoder.device(), non_blocking=True)).float().cpu())
    return torch.cat(features)

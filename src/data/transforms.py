"""The paper's image transforms at the backbone's input size."""

from __future__ import annotations

from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torchvision import transforms as T

BICUBIC = T.InterpolationMode.BICUBIC


def _rgb(image):
    return image.convert("RGB")


def train_transform(size: int) -> T.Compose:
    """RandomResizedCrop(scale 0.08-1, bicubic) + horizontal flip + CLIP normalisation.

    open_clip's own train transform has no flip, so this one is composed here.
    """
    return T.Compose(
        [
            T.Lambda(_rgb),
            T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD),
        ]
    )


def eval_transform(size: int) -> T.Compose:
    """Resize the shorter side (bicubic), centre crop, CLIP normalisation."""
    return T.Compose(
        [
            T.Lambda(_rgb),
            T.Resize(size, interpolation=BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD),
        ]
    )


def describe(size: int) -> dict[str, str]:
    """What each transform does, recorded with every run's results."""
    return {
        "train": f"RandomResizedCrop({size}, scale=(0.08, 1.0), bicubic) + HFlip + CLIP norm",
        "test": f"Resize({size}, bicubic) + CenterCrop({size}) + CLIP norm",
    }

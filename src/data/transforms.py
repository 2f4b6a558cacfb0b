"""The paper's image transforms at the backbone's input size."""

from __future__ import annotations

import torch
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torchvision import transforms as T

BICUBIC = T.InterpolationMode.BICUBIC


def _rgb(image):
    return image.convert("RGB")


PAPER_CROP_SCALE = (0.08, 1.0)


def train_transform(
    size: int, crop_scale: tuple[float, float] = PAPER_CROP_SCALE, hflip: bool = True
) -> T.Compose:
    """RandomResizedCrop(scale 0.08-1, bicubic) + horizontal flip + CLIP normalisation.

    open_clip's own train transform has no flip, so this one is composed here. A dataset whose
    images lose their content in small or mirrored crops (digits) sets its own `crop_scale`, `hflip`.
    """
    flip = [T.RandomHorizontalFlip()] if hflip else []
    return T.Compose(
        [
            T.Lambda(_rgb),
            T.RandomResizedCrop(size, scale=tuple(crop_scale), interpolation=BICUBIC),
            *flip,
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


def describe(
    size: int, crop_scale: tuple[float, float] = PAPER_CROP_SCALE, hflip: bool = True
) -> dict[str, str]:
    """What each transform does, recorded with every run's results."""
    low, high = crop_scale
    return {
        "train": f"RandomResizedCrop({size}, scale=({low}, {high}), bicubic)"
        + (" + HFlip" if hflip else "")
        + " + CLIP norm",
        "test": f"Resize({size}, bicubic) + CenterCrop({size}) + CLIP norm",
    }


class AugmentedViews:
    """Test-time prompt tuning's views of one image (Shu et al., 2022): the eval transform's view,
    then `views` random ones, each a RandomResizedCrop (default scale and interpolation, as the
    reference) and a flip, followed by AugMix (severity 1, the AugMix paper's operations) when
    `augmix` (the reference uses it on every dataset but ImageNet and its variants). The image
    becomes a tensor [1 + views, 3, size, size]."""

    def __init__(self, size: int, views: int = 63, augmix: bool = True) -> None:
        if views < 1:
            raise ValueError(
                f"method.data.test_transform.views={views}: test-time tuning needs at least 1 view"
            )
        self.views = views
        self.original = eval_transform(size)
        augment = [T.Lambda(_rgb), T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
        if augmix:
            augment.append(T.AugMix(severity=1, all_ops=False))
        normalise = [T.ToTensor(), T.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)]
        self.augment = T.Compose(augment + normalise)

    def __call__(self, image):
        return torch.stack([self.original(image)] + [self.augment(image) for _ in range(self.views)])

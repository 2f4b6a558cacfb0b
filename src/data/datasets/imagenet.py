"""ImageNet: imagenet/images/{train,val}/<wnid>/*, classnames.txt (`<wnid> <class name>` lines).

Labels follow the sorted wnid folders. As in the reference, the validation images are the test
set: ImageNet has no other labelled held-out images.

Class names: CoOp's file (`names="coop"`, the default), or OpenAI's cleaned list (`names="openai"`:
"kite (bird of prey)", "crane bird", ..., the list of CLIP-LoRA's official code and of open_clip's
zero-shot ImageNet classifier), which needs no classnames.txt. That list names two pairs of
classes alike ("missile", "sunglasses"); they are kept as the official code keeps them.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from src.common.messages import one_of
from src.data.datasets.base import (
    DatasetError,
    DatasetReader,
    class_folders,
    images_in_class_folders,
    map_classnames,
    read_classnames,
)
from src.data.samples import Splits

NAMES = ("coop", "openai")


def openai_classnames() -> dict[str, str]:
    """wnid -> OpenAI's cleaned ImageNet class name, for the 1000 classes of ImageNet-1k.

    open_clip ships the names (`IMAGENET_CLASSNAMES`, in ImageNet-1k's class order, the sorted
    wnids) and timm, open_clip's dependency, the wnids in that order: read from both rather than
    copied into this project.
    """
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES  # noqa: PLC0415 (only for names=openai)
    from timm.data import ImageNetInfo  # noqa: PLC0415

    return dict(zip(ImageNetInfo("imagenet-1k").label_names(), IMAGENET_CLASSNAMES, strict=True))


class ImageNet(DatasetReader):
    name = "imagenet"
    folder = "imagenet"
    val_is_test = True

    def __init__(self, root: str | Path, names: str = "coop") -> None:
        super().__init__(root)
        if names not in NAMES:
            raise ValueError(one_of("dataset.reader.names", names, NAMES, "openai: OpenAI's cleaned list"))
        self.names = names

    def _read(self) -> Splits:
        train_dir = self.require(self.root / "images" / "train", "the ImageNet train set, a folder per wnid")
        val_dir = self.require(self.root / "images" / "val", "the ImageNet val set, a folder per wnid")
        folders = class_folders(train_dir)
        if self.names == "openai":
            known = openai_classnames()
            unknown = [folder for folder in folders if folder not in known]
            if unknown:
                raise DatasetError(
                    f"{train_dir}: folders {unknown[:5]} ({len(unknown)} in all) are not ImageNet-1k wnids, "
                    "which OpenAI's class names are for: rename them, or use dataset.reader.names=coop "
                    "(classnames.txt)"
                )
            classnames = [known[folder] for folder in folders]
            # the list names two pairs of classes alike ("missile", "sunglasses"): kept, as the
            # official code trains them (each pair shares one prompt)
            self.repeated_names = frozenset(name for name, n in Counter(known.values()).items() if n > 1)
        else:
            names_file = self.require(self.root / "classnames.txt", "ImageNet's class names (CoOp's file)")
            classnames = map_classnames(folders, read_classnames(names_file), names_file)
        train = images_in_class_folders(train_dir, folders, classnames)
        test = images_in_class_folders(val_dir, folders, classnames)
        return Splits(train, test, test, classnames)

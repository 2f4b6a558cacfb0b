"""What every dataset reader shares: the split files (read verbatim, or made as the reference makes
them and saved), class-name files, per-class splitting, folder listing and clear errors."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import defaultdict
from pathlib import Path

from src.common.files import write_json
from src.data.samples import Sample, Splits

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
SPLIT_SEED = 1  # generated splits are a pure function of the folder's contents


class DatasetError(ValueError):
    """A dataset folder or file is missing or malformed; the message says what to do."""


class DatasetReader:
    """Turns a dataset folder into train/val/test lists of (path, label, classname)."""

    name: str = ""  # the config name (conf/dataset/<name>.yaml)
    folder: str = ""  # the folder name under $DATA, as in the reference's preparation guide
    in_prepare_guide: bool = True  # `python -m src.data.prepare <name>` knows where to get its files
    # Its val split is its test set (ImageNet: no other labelled held-out images); a sampler that
    # draws validation images from train (data.fewshot_sampler=clip_lora) does so here.
    val_is_test: bool = False
    # Names its own class list gives to several classes (OpenAI's ImageNet names): accepted, not
    # refused as two classes whose prompts would be the same.
    repeated_names: frozenset[str] = frozenset()

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def read(self) -> Splits:
        if not self.root.is_dir():
            raise DatasetError(
                f"dataset folder {self.root} not found: lay the data out as docs/datasets.md says "
                f"or point paths.data_dir at the folder holding {self.root.name}/"
                + self._prepare_hint("says what goes in it")
            )
        return self._read()

    def _read(self) -> Splits:
        raise NotImplementedError

    def require(self, path: Path, what: str) -> Path:
        """`path`, or an error naming it, what it is, and where `prepare` tells how to get it."""
        if not path.exists():
            raise DatasetError(f"{path} not found: {what}" + self._prepare_hint("says where to get it"))
        return path

    def _prepare_hint(self, what: str) -> str:
        if not (self.name and self.in_prepare_guide):
            return ""
        return f" (`python -m src.data.prepare {self.name} --data-dir {self.root.parent}` {what})"


class SplitFileReader(DatasetReader):
    """A dataset split by the reference's split_zhou_*.json.

    The file is read verbatim when present. Without it the split is made as the reference makes it
    (`make_split`), deterministically, and saved next to the data, or under `cache_dir` when the
    data folder cannot be written, so that every later run reads the same split.
    """

    split_file: str = ""  # e.g. split_zhou_OxfordPets.json
    image_dir: str = ""  # the folder, inside root, that the split's paths are relative to
    split_rule: str = ""  # how `make_split` splits, for the log

    def __init__(self, root: str | Path, cache_dir: str | Path | None = None) -> None:
        super().__init__(root)
        self.cache_dir = Path(cache_dir) if cache_dir else None

    @property
    def images(self) -> Path:
        return self.root / self.image_dir

    def make_split(self) -> tuple[list[Sample], list[Sample], list[Sample]]:
        raise NotImplementedError

    def _read(self) -> Splits:
        for path in (self.root / self.split_file, self.cached_split_file):
            if path is not None and path.is_file():
                return read_split_json(path, self.images)
        train, val, test = self.make_split()
        splits = Splits(train, val, test, classnames_of(train + val + test))
        self._save(splits)
        return splits

    @property
    def cached_split_file(self) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:10]
        return self.cache_dir / "splits" / f"{self.root.name}-{key}" / self.split_file

    def _save(self, splits: Splits) -> None:
        data = {
            key: [[Path(s.path).relative_to(self.images).as_posix(), s.label, s.classname] for s in items]
            for key, items in (("train", splits.train), ("val", splits.val), ("test", splits.test))
        }
        try:
            path = write_json(self.root / self.split_file, data)
        except OSError as err:  # e.g. a dataset folder mounted read-only on a shared cluster
            if self.cached_split_file is None:
                log.warning("%s is not writable (%s); the split made in memory is not saved", self.root, err)
                return
            path = write_json(self.cached_split_file, data)
            log.info("%s is not writable (%s): the split goes to the cache folder", self.root, err)
        log.warning(
            "%s has no %s: made one as the reference does (%s) and saved it to %s; it is not the split "
            "of the paper (`python -m src.data.prepare %s` says where to get that one)",
            self.root,
            self.split_file,
            self.split_rule,
            path,
            self.name,
        )


class ClassFolderReader(SplitFileReader):
    """One sub-folder of images per class; without a split file each class is split 50/20/30."""

    ignore: tuple[str, ...] = ()  # class folders the reference leaves out
    renames: dict[str, str] = {}  # folder -> class name, where the reference renames
    split_rule: str = "each class split 50/20/30 into train/val/test"

    def make_split(self) -> tuple[list[Sample], list[Sample], list[Sample]]:
        directory = self.require(self.images, f"the {self.image_dir}/ folder of {self.folder}")
        folders = class_folders(directory, ignore=self.ignore)
        items = images_in_class_folders(directory, folders, [self.renames.get(f, f) for f in folders])
        return split_per_class(items, p_train=0.5, p_val=0.2)


class TestOnlyClassFolders(DatasetReader):
    """A test-only ImageNet variant: one folder per wnid present (sorted, labelled 0..n-1), named
    from the classnames.txt copied from ImageNet; files beside the folders (README.txt) are ignored."""

    image_dir: str = ""

    def _read(self) -> Splits:
        names_file = self.require(self.root / "classnames.txt", "copy imagenet/classnames.txt here")
        directory = self.require(self.root / self.image_dir, f"the {self.name} images, one folder per wnid")
        folders = class_folders(directory)
        classnames = map_classnames(folders, read_classnames(names_file), names_file)
        return Splits([], [], images_in_class_folders(directory, folders, classnames), classnames)


def read_split_json(path: Path, image_dir: Path) -> Splits:
    """The reference's split_zhou_*.json: {"train"|"val"|"test": [[rel_path, label, name], ...]}."""
    try:
        raw = json.loads(path.read_text())
        splits = {
            key: [Sample(str(image_dir / rel), int(label), name) for rel, label, name in raw[key]]
            for key in ("train", "val", "test")
        }
    except (json.JSONDecodeError, KeyError, ValueError, TypeError) as err:
        raise DatasetError(
            f"{path} is not a valid split file ({err}): delete it to have it made again"
        ) from err
    try:
        classnames = classnames_of(splits["train"] + splits["test"])
    except DatasetError as err:
        raise DatasetError(f"{path}: {err}: fix its labels, or delete it to have it made again") from err
    return Splits(**splits, classnames=classnames)


def classnames_of(items: list[Sample]) -> list[str]:
    names = {item.label: item.classname for item in items}
    if sorted(names) != list(range(len(names))):
        found = sorted(names)
        shown = f"{found[:10]}"[:-1] + (", ...]" if len(found) > 10 else "]")
        raise DatasetError(f"labels must be 0..{len(names) - 1}, one per class; found {shown}")
    return [names[label] for label in range(len(names))]


def read_classnames(path: Path) -> dict[str, str]:
    """Folder (or label) -> class name: a JSON object, or lines `<folder> <class name with spaces>`
    as in ImageNet's classnames.txt. Order is kept."""
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object {folder: class name}")
            return {str(key): str(value) for key, value in data.items()}
        names = {}
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split(maxsplit=1)
            if len(parts) != 2:
                raise ValueError(f"line {number} is {line!r}, expected '<folder> <class name>'")
            names[parts[0]] = parts[1].strip()
        return names
    except (ValueError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path} is not a class-name file ({err}): fix or replace it") from err


def map_classnames(keys: list[str], names: dict[str, str], source: Path) -> list[str]:
    missing = [key for key in keys if key not in names]
    if missing:
        raise DatasetError(
            f"{source} has no class name for {missing[:5]} ({len(missing)} missing): add a line "
            f"'{missing[0]} <class name>' for each"
        )
    return [names[key] for key in keys]


def _by_label(items: list[Sample]) -> dict[int, list[Sample]]:
    """Items per label, sorted by path: what follows depends on the contents, not the listing order."""
    by_label: dict[int, list[Sample]] = defaultdict(list)
    for item in items:
        by_label[item.label].append(item)
    return {label: sorted(by_label[label], key=lambda s: s.path) for label in sorted(by_label)}


def split_per_class(
    items: list[Sample], p_train: float = 0.5, p_val: float = 0.2, seed: int = SPLIT_SEED
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Each class split train/val/test by fractions (the reference's 50/20/30), deterministically."""
    rng = random.Random(seed)
    train, val, test = [], [], []
    for group in _by_label(items).values():
        rng.shuffle(group)
        n_train = round(len(group) * p_train)
        n_val = round(len(group) * p_val)
        train += group[:n_train]
        val += group[n_train : n_train + n_val]
        test += group[n_train + n_val :]
    return train, val, test


def split_off(
    items: list[Sample], fraction: float = 0.2, seed: int = SPLIT_SEED
) -> tuple[list[Sample], list[Sample]]:
    """(rest, split off): `fraction` of each class split off, deterministically. With 0.2 this is the
    reference's train/val split of an official trainval list."""
    rng = random.Random(seed)
    rest, off = [], []
    for group in _by_label(items).values():
        rng.shuffle(group)
        n_off = round(len(group) * fraction)
        off += group[:n_off]
        rest += group[n_off:]
    return rest, off


def list_images(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def class_folders(directory: Path, ignore: tuple[str, ...] = ()) -> list[str]:
    """The sorted sub-folder names (labels follow this order, as in the reference)."""
    return sorted(
        p.name
        for p in directory.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name not in ignore
    )


def images_in_class_folders(directory: Path, folders: list[str], classnames: list[str]) -> list[Sample]:
    items = []
    for label, (folder, name) in enumerate(zip(folders, classnames, strict=True)):
        path = directory / folder
        if not path.is_dir():
            raise DatasetError(f"{path} not found: {directory} needs one folder per class ({folders[0]}, ..)")
        items += [Sample(str(p), label, name) for p in list_images(path)]
    return items


def fill_missing_splits(
    train: list[Sample], val: list[Sample] | None, test: list[Sample] | None
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Custom data: a missing val and/or test set is split off train per class, deterministically
    (neither: 50/20/30 as the reference; no val: 20% of train; no test: 30% of train)."""
    if val is None and test is None:
        return split_per_class(train, p_train=0.5, p_val=0.2)
    if val is None:
        train, val = split_off(train, 0.2)
    if test is None:
        train, test = split_off(train, 0.3)
    return train, val, test

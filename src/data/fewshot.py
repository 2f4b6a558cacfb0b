"""k-shot subsets of the train and val splits, drawn by one of two samplers, saved with each run and
reusable.

- `reference` (the default): the reference's draw, so the same seed and shots give the same images as
  the original code on the same split file (the list order of the split matters);
- `sorted`: a pure function of the split's contents (paths sorted first), the same on any machine
  whatever order a reader or file system lists the images in;
- `clip_lora`: the draw of CLIP-LoRA's official code (MaxZanella/CLIP-LoRA, `datasets/`), so that
  its runs see the images the official ones do.

Either way the subsets are drawn over all classes, before `dataset.subsample` keeps the base or new
ones, as the reference does.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from pathlib import Path
from typing import Literal, get_args

from src.common.files import write_json
from src.common.messages import one_of
from src.data.datasets.base import DatasetError
from src.data.samples import Sample, Splits, relative_path

FewShotSampler = Literal["reference", "sorted", "clip_lora"]
SAMPLERS: tuple[str, ...] = get_args(FewShotSampler)
VAL_SHOTS = 4  # validation keeps min(shots, 4) images per class, as the reference does


def draw_fewshot(
    train: list[Sample],
    val: list[Sample],
    shots: int,
    seed: int,
    sampler: FewShotSampler,
    val_is_test: bool = False,
) -> tuple[list[Sample], list[Sample]]:
    """`shots` images per class from `train`, min(shots, 4) from `val`. `val_is_test`: the dataset's
    val split is its test set (ImageNet); the `clip_lora` sampler then draws val images from train."""
    val_shots = min(shots, VAL_SHOTS)
    if sampler == "reference":
        chosen_train, chosen_val = reference_few_shot([(train, shots), (val, val_shots)], seed)
        return chosen_train, chosen_val
    if sampler == "sorted":
        return few_shot(train, shots, seed), few_shot(val, val_shots, seed)
    if sampler == "clip_lora":
        if val_is_test:
            return train_and_val_from_train(train, shots, val_shots, seed)
        # its datasets draw the val subset first, then train, on Dassl's older repeat=True
        chosen_val, chosen_train = reference_few_shot([(val, val_shots), (train, shots)], seed, repeat=True)
        return chosen_train, chosen_val
    raise ValueError(one_of("data.fewshot_sampler", sampler, SAMPLERS, "reference: the original code's"))


def train_and_val_from_train(
    train: list[Sample], shots: int, val_shots: int, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """CLIP-LoRA's ImageNet draw (its `datasets/imagenet.py`): per class, in label order, one
    `random.sample` of `shots + val_shots` images of the train list in path order (as torchvision's
    ImageFolder lists them), the first `shots` to train and the rest to val; one stream of Python's
    `random` seeded with the run's seed (its `set_random_seed`; nothing draws before the data). A
    class with fewer images gives them all in drawn order, `shots` of them to train (the official
    code stops there)."""
    _check_shots(shots)
    rng = random.Random(seed)
    by_label: dict[int, list[Sample]] = defaultdict(list)
    for item in sorted(train, key=lambda s: (s.label, s.path)):
        by_label[item.label].append(item)
    chosen_train: list[Sample] = []
    chosen_val: list[Sample] = []
    for group in by_label.values():
        drawn = rng.sample(group, min(len(group), shots + val_shots))
        chosen_train += drawn[:shots]
        chosen_val += drawn[shots:]
    return chosen_train, chosen_val


def reference_few_shot(
    pools: list[tuple[list[Sample], int]], seed: int, repeat: bool = False
) -> list[list[Sample]]:
    """The reference's draw (Dassl's `DatasetBase.generate_fewshot_dataset`) from each of `pools`, a
    list of (images, shots), in order.

    Written out here because it must be this exact sequence of calls: one stream of Python's `random`
    seeded with the run's seed (the reference seeds the global stream at start-up and draws nothing
    before; `random.Random(seed)` gives the same numbers), continued from the train draw to the val
    draw. Per pool, the classes in the order in which they first appear and each class's images in
    list order; `random.sample(images, k)` for a class of at least k images, all of them for a
    smaller one (Dassl's current `repeat=False`), or `random.choices(images, k=k)` with `repeat`
    (Dassl's older default, which CLIP-LoRA's copy keeps).
    """
    rng = random.Random(seed)
    chosen = []
    for items, shots in pools:
        _check_shots(shots)
        by_label: dict[int, list[Sample]] = defaultdict(list)  # insertion order: first appearance
        for item in items:
            by_label[item.label].append(item)
        subset: list[Sample] = []
        for group in by_label.values():
            if len(group) >= shots:
                subset.extend(rng.sample(group, shots))
            else:
                subset.extend(rng.choices(group, k=shots) if repeat else group)
        chosen.append(subset)
    return chosen


def few_shot(items: list[Sample], shots: int, seed: int) -> list[Sample]:
    """The `sorted` sampler: `shots` images per class drawn at random (seeded); a class with fewer
    keeps them all.

    Items are sorted by path first, so the subset does not depend on the order in which a
    reader listed them, on the machine, or on the number of workers or GPUs.
    """
    _check_shots(shots)
    by_label: dict[int, list[Sample]] = defaultdict(list)
    for item in items:
        by_label[item.label].append(item)
    rng = random.Random(seed)
    chosen: list[Sample] = []
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda s: s.path)
        chosen.extend(group if len(group) <= shots else rng.sample(group, shots))
    return chosen


def _check_shots(shots: int) -> None:
    if shots < 1:
        raise ValueError(f"shots={shots}: the number of images per class must be at least 1")


def save_fewshot(
    path: str | Path,
    root: Path,
    train: list[Sample],
    val: list[Sample],
    shots: int,
    seed: int,
    sampler: FewShotSampler | None,
    source: str | None,
) -> Path:
    """The chosen images as JSON, paths relative to the dataset folder so the list works on any machine
    that has the same data: give it back as `data.fewshot_file` to rerun on exactly this subset.

    The lists are the draw over all classes with the split's labels (a base-class run's list also
    holds the new classes, as the reference's saved subsets do); `sampler` says which sampler drew
    them (None: unknown), `source` the file they were read from (None: drawn by this run).
    """

    def rows(items: list[Sample]) -> list[list]:
        return fewshot_rows(items, root)

    return write_json(
        path,
        {
            "root": str(root),
            "shots": shots,
            "seed": seed,
            "sampler": sampler,
            "source": source,
            "train": rows(train),
            "val": rows(val),
        },
    )


def fewshot_rows(items: list[Sample], root: Path) -> list[list]:
    """A few-shot list's rows as fewshot.json holds them: [path relative to `root`, label, class]."""
    return [[relative_path(item.path, root), item.label, item.classname] for item in items]


def check_record(path: Path, root: Path, train: list[Sample], val: list[Sample]) -> None:
    """The few-shot images a resumed run selects now are the ones its fewshot.json recorded when it
    started; else DatasetError naming what changed and how to start over (the record is kept)."""
    try:
        saved = json.loads(path.read_text())
        recorded = {key: [tuple(row[:3]) for row in saved[key]] for key in ("train", "val")}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DatasetError(
            f"{path} cannot be read ({type(err).__name__}): the resumed run cannot tell its few-shot "
            f"images; start over with another folder (hydra.run.dir=<folder>) or delete {path.parent}"
        ) from err
    for key, items in (("train", train), ("val", val)):
        now = [tuple(row) for row in fewshot_rows(items, root)]
        if now == recorded[key]:
            continue
        changed = sorted(set(recorded[key]) ^ set(now)) or recorded[key][:1]
        rel, label, classname = changed[0]
        raise DatasetError(
            f"{path}: this run started on other {key} images than the data gives now ({len(changed)} "
            f"differ, e.g. {rel} of class {label} {classname!r}): its images, class list or split file "
            f"changed; start over with another folder (hydra.run.dir=<folder>) or delete {path.parent}"
        )


def load_fewshot(
    path: str | Path, root: Path, splits: Splits
) -> tuple[list[Sample], list[Sample], FewShotSampler | None]:
    """A saved list (`save_fewshot`), checked against the split (all classes): every image must be
    in it, with the same label. Also returns the sampler that drew it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        rows = {key: [(str(rel), int(label)) for rel, label, _ in data[key]] for key in ("train", "val")}
        sampler = data.get("sampler")
    except FileNotFoundError as err:
        raise DatasetError(f"data.fewshot_file={path} not found: give the fewshot.json of a run") from err
    except (json.JSONDecodeError, KeyError, ValueError, TypeError) as err:
        raise DatasetError(
            f"data.fewshot_file={path} is not a few-shot list ({err}): give a run's fewshot.json"
        ) from err
    chosen = {}
    for key, pool in (("train", splits.train), ("val", splits.val)):
        by_path = {os.path.normpath(item.path): item for item in pool}
        chosen[key] = []
        for rel, label in rows[key]:
            item = by_path.get(os.path.normpath(root / rel))
            if item is None or item.label != label:
                raise DatasetError(
                    f"data.fewshot_file={path}: {rel} (label {label}) is not in the {key} split of {root}: "
                    "the list was made for other data; give the matching list or drop data.fewshot_file"
                )
            chosen[key].append(item)
    return chosen["train"], chosen["val"], sampler

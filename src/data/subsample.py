"""Base and new classes of the base-to-new protocol (from the follow-up paper, CoCoOp)."""

from __future__ import annotations

import math
from typing import Literal

from src.common.messages import one_of
from src.data.samples import Sample, Splits

Subsample = Literal["all", "base", "new"]


def subsample_classes(splits: Splits, subsample: Subsample) -> Splits:
    """The first ceil(n/2) labels (`base`), the rest (`new`) or all, relabelled from 0.

    Labels are taken in sorted order, as the reference does, so base and new never overlap and
    their union is the whole class list.
    """
    if subsample not in ("all", "base", "new"):
        raise ValueError(one_of("dataset.subsample", subsample, ("all", "base", "new")))
    if subsample == "all":
        return splits
    labels = list(range(len(splits.classnames)))
    n_base = math.ceil(len(labels) / 2)
    kept = labels[:n_base] if subsample == "base" else labels[n_base:]
    if len(kept) < 2:
        raise ValueError(
            f"dataset.subsample={subsample} keeps {len(kept)} of {len(labels)} classes: the base-to-new "
            "split needs a dataset of at least 4 classes"
        )
    relabel = {label: new for new, label in enumerate(kept)}

    def keep(items: list[Sample]) -> list[Sample]:
        return [item._replace(label=relabel[item.label]) for item in items if item.label in relabel]

    return Splits(
        keep(splits.train), keep(splits.val), keep(splits.test), [splits.classnames[i] for i in kept]
    )


def subsample_suffix(subsample: Subsample) -> str:
    """What run folders add to the dataset's name (`oxford_pets_base`), so that a base-class run
    never resumes from or overwrites a run on all classes."""
    return "" if subsample == "all" else f"_{subsample}"

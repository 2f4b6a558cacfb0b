"""The labelled image lists that every dataset reader produces."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple


class Sample(NamedTuple):
    path: str
    label: int
    classname: str


@dataclass(frozen=True)
class Splits:
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    classnames: list[str]


def relative_path(path: str, root: Path) -> str:
    """`path` within the dataset folder `root`, with "/" (as saved lists hold it), or `path` itself
    when outside; by string, as ImageNet has 1.28 million."""
    prefix = str(root).rstrip("/\\") + os.sep
    path = path[len(prefix) :] if path.startswith(prefix) else path
    return path.replace(os.sep, "/")

"""The labelled image lists that every dataset reader produces."""

from __future__ import annotations

from dataclasses import dataclass
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

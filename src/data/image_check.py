"""Checks that the images a run uses exist and open, before any training starts.

Only the images actually used are checked (the few-shot train/val subsets and the test split), each
by reading its header (`PIL.Image.verify`), in threads since the work is file I/O: this stays cheap
even for ImageNet's 50,000 test images.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from src.data.datasets.base import DatasetError
from src.data.samples import Sample

log = logging.getLogger(__name__)

MISSING = "missing"


class ImageCheck:
    """Missing images are always an error; an unreadable one is an error naming its path, or, with
    `skip_bad=True`, dropped and counted (`report` logs the count)."""

    def __init__(self, skip_bad: bool = False) -> None:
        self.skip_bad = skip_bad
        self.problems: dict[str, str | None] = {}  # path -> problem (None: fine), checked once

    def keep_good(self, items: list[Sample]) -> list[Sample]:
        todo = sorted({item.path for item in items} - self.problems.keys())
        if todo:
            with ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4)) as pool:
                self.problems.update(zip(todo, pool.map(_problem, todo), strict=True))
        missing = [item.path for item in items if self.problems[item.path] == MISSING]
        if missing:
            raise DatasetError(
                f"{missing[0]} not found ({len(missing)} images of the split are missing): "
                "restore the images or regenerate the split file"
            )
        bad = [item.path for item in items if self.problems[item.path]]
        if bad and not self.skip_bad:
            raise DatasetError(
                f"{bad[0]} cannot be read ({self.problems[bad[0]]}; {len(bad)} such images): replace or "
                "remove it, or set data.skip_bad_images=true to leave unreadable images out"
            )
        return [item for item in items if not self.problems[item.path]]

    @property
    def skipped(self) -> list[str]:
        return sorted(path for path, problem in self.problems.items() if problem)

    def report(self) -> None:
        if self.skipped:
            log.warning(
                "left out %d unreadable images (data.skip_bad_images=true), e.g. %s: %s",
                len(self.skipped),
                self.skipped[0],
                self.problems[self.skipped[0]],
            )


def _problem(path: str) -> str | None:
    if not Path(path).is_file():
        return MISSING
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as err:  # PIL raises many kinds (OSError, SyntaxError, struct.error, ...) for bad files
        return f"{type(err).__name__}: {err}"
    return None

"""Custom data without code: `dataset=csv dataset.train=train.csv [dataset.val=...] [dataset.test=...]`.

Each CSV has the columns path,label: label is the class name, a relative path is relative to the
CSV's folder. Labels follow the sorted class names of all the files; a missing val or test set is
split off train deterministically. An optional class-name file maps each label to the words used
in the prompt (`<label> <words>` lines, or a JSON object).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from src.data.datasets.base import (
    DatasetError,
    DatasetReader,
    fill_missing_splits,
    map_classnames,
    read_classnames,
)
from src.data.samples import Sample, Splits


class CsvLists(DatasetReader):
    name = "csv"
    in_prepare_guide = False

    def __init__(
        self,
        train: str | Path | None,
        val: str | Path | None = None,
        test: str | Path | None = None,
        classnames: str | Path | None = None,
    ) -> None:
        if train is None:
            raise DatasetError("dataset=csv needs dataset.train=<CSV with the columns path,label>")
        super().__init__(Path(train).parent)
        self.files = {"train": Path(train), "val": val and Path(val), "test": test and Path(test)}
        self.classnames_file = Path(classnames) if classnames else None

    def read(self) -> Splits:
        for split, path in self.files.items():
            if path is not None:
                self.require(path, f"the {split} CSV given as dataset.{split}")
        return super().read()

    def _read(self) -> Splits:
        rows = {split: _read_csv(path) for split, path in self.files.items() if path is not None}
        labels = sorted({label for table in rows.values() for _, label in table})
        if self.classnames_file is None:
            classnames = labels
        else:
            names_file = self.require(self.classnames_file, "the class-name file given as dataset.classnames")
            classnames = map_classnames(labels, read_classnames(names_file), names_file)
        index = {label: i for i, label in enumerate(labels)}
        lists = {
            split: [Sample(path, index[label], classnames[index[label]]) for path, label in table]
            for split, table in rows.items()
        }
        train, val, test = fill_missing_splits(lists["train"], lists.get("val"), lists.get("test"))
        return Splits(train, val, test, classnames)


def _read_csv(path: Path) -> list[tuple[str, str]]:
    """(image path, label) rows; relative image paths are taken from the CSV's folder."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path} is not a readable CSV ({err}): give it a header path,label") from err
    if not {"path", "label"} <= set(table.columns):
        raise DatasetError(
            f"{path} needs the columns path,label (label = class name); its header is {list(table.columns)}"
        )
    empty = table.index[(table["path"].str.strip() == "") | (table["label"].str.strip() == "")]
    if len(empty):
        raise DatasetError(f"{path}: line {empty[0] + 2} has an empty path or label: fill it in or remove it")
    if table.empty:
        raise DatasetError(f"{path} has no rows: list one image per line as path,label")
    pairs = zip(table["path"], table["label"], strict=True)
    return [(str(path.parent / image.strip()), label.strip()) for image, label in pairs]

"""The few-shot subsets that the reference saved next to the data, read safely.

The reference (CoOp on Dassl) writes `<dataset folder>/split_fewshot/shot_{K}-seed_{S}.pkl` on its
first run with K shots and seed S and reads it back in later runs: a pickled dict
{"train": [Datum, ...], "val": [Datum, ...]} ("train" only for ImageNet), each Datum holding the
absolute image path of the machine it ran on (`_impath`), `_label`, `_domain` and `_classname`.
Reading these files gives a `$DATA` folder used with the original code the same images here.

A pickle can run any code when loaded, so it is read by an unpickler that builds a plain record
for Dassl's Datum and refuses every other class or function.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from src.data.datasets.base import DatasetError
from src.data.samples import Sample, Splits, relative_path

DATUM = ("dassl.data.datasets.base_dataset", "Datum")
DATUM_FIELDS = ("_impath", "_label", "_domain", "_classname")


def reference_fewshot_file(root: Path, shots: int, seed: int) -> Path:
    return root / "split_fewshot" / f"shot_{shots}-seed_{seed}.pkl"


class PickledDatum:
    """What a pickled Dassl Datum becomes: its four fields, nothing callable."""

    impath: str
    label: int

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or set(state) != set(DATUM_FIELDS):
            raise pickle.UnpicklingError(f"a Datum without the fields {DATUM_FIELDS}")
        if not isinstance(state["_impath"], str) or type(state["_label"]) is not int:
            raise pickle.UnpicklingError("a Datum whose path is not text or whose label is not a number")
        self.impath, self.label = state["_impath"], state["_label"]


class DatumUnpickler(pickle.Unpickler):
    """Unpickles plain data and Dassl's Datum (as `PickledDatum`) only."""

    def find_class(self, module: str, name: str) -> type:
        if (module, name) == DATUM:
            return PickledDatum
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: only Dassl's Datum is allowed")


def read_reference_fewshot(
    path: Path, root: Path, splits: Splits
) -> tuple[list[Sample], list[Sample] | None]:
    """The train and val subsets of the reference's pickle as this project's images (val None where
    the pickle has none, as for ImageNet), matched by path within the dataset folder and checked
    for the same label."""
    fix = "move it out of split_fewshot/ to draw the subsets here instead"
    try:
        with path.open("rb") as file:
            data = DatumUnpickler(file).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise DatasetError(f"{path} is not a few-shot file of the reference ({err}): {fix}") from err
    if not isinstance(data, dict) or not isinstance(data.get("train"), list):
        raise DatasetError(f"{path} is not a few-shot file of the reference (no train list): {fix}")
    chosen = {}
    for key, pool in (("train", splits.train), ("val", splits.val)):
        if key not in data:
            chosen[key] = None
            continue
        by_relative = {relative_path(item.path, root): item for item in pool}
        chosen[key] = [_match(datum, by_relative, path, key, root, fix) for datum in data[key]]
    return chosen["train"], chosen["val"]


def _match(datum: Any, by_relative: dict[str, Sample], path: Path, key: str, root: Path, fix: str) -> Sample:
    """The image whose path within the dataset folder ends the datum's absolute path (written on
    another machine): the longest such tail wins."""
    if not isinstance(datum, PickledDatum):
        raise DatasetError(f"{path}: its {key} list holds {type(datum).__name__}, not Datum: {fix}")
    parts = datum.impath.replace("\\", "/").split("/")
    for start in range(len(parts)):
        item = by_relative.get("/".join(parts[start:]))
        if item is not None:
            if item.label != datum.label:
                raise DatasetError(
                    f"{path}: {datum.impath} has label {datum.label} there and {item.label} in the split of "
                    f"{root}: the pickle was made with another split file; {fix}"
                )
            return item
    raise DatasetError(
        f"{path}: {datum.impath} is not in the {key} split of {root}: the pickle was made for other "
        f"data; {fix}"
    )

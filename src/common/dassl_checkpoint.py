"""Dassl checkpoints: how the original repositories (CoOp, CoCoOp, KgCoOp, ProGrad, MaPLe, PromptSRC,
all trained with Dassl.pytorch) save and publish trained prompts, read without running pickled code.

Dassl's `save_checkpoint` (dassl/utils/torchtools.py) `torch.save`s a dict: `state_dict` (the
registered model's: a prompt learner, or the whole prompted CLIP), `epoch`, `optimizer`,
`scheduler` and `val_result`, to `<output>/<model name>/model.pth.tar-<epoch>` (or
`model-best.pth.tar`), and names the latest in `<output>/<model name>/checkpoint`. Which tensors a
state dict holds, and what they are in this project's methods, is src/methods/released.py's.

Such a file is an ordinary pickle, so it is read with `RestrictedUnpickler`, which finds only the
globals Dassl writes: torch's tensor and storage rebuilding, `collections.OrderedDict`, and the
optimiser and LR scheduler state (`scheduler` holds Dassl's warm-up wrapper's `successor`, a
pickled `torch.optim.lr_scheduler.CosineAnnealingLR` object, whose `optimizer` is a pickled SGD
with `collections.defaultdict` state). `torch.load(weights_only=True)` with those classes added by
`torch.serialization.safe_globals` does not suffice: its unpickler refuses to fill a
`defaultdict` (SETITEMS), which every SGD with momentum has once it has stepped. Here the
optimiser and scheduler classes are unpickled as inert records of their attributes, never as the
classes themselves, and any other global (a function or class a crafted file names to run code)
is refused before anything of the file runs.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import re
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch._weights_only_unpickler import _get_allowed_globals

from src.common.files import atomic_write, save_torch

BEST = "model-best.pth.tar"  # Dassl's file of the epoch with the best validation accuracy
EPOCH_FILE = re.compile(r"^model\.pth\.tar-(\d+)$")  # Dassl's file of epoch N
LATEST = "checkpoint"  # the text file naming the latest file of a model's folder
DASSL_FORMAT = "dassl"  # `format` of what `read_dassl` returns (a prompt file's is an int)
FIX = (
    "give a Dassl checkpoint (<output>/<model>/model.pth.tar-<epoch> or model-best.pth.tar, as the "
    "original repositories save them), its folder, or a prompt.pt of this project"
)

# What Dassl's checkpoints pickle besides tensors: the containers of the state dicts, and the
# optimiser and scheduler objects the scheduler's state holds (torch.optim's, as Dassl builds them).
CONTAINERS = {
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("collections", "Counter"),  # MultiStepLR's milestones
    ("builtins", "dict"),  # a defaultdict's factory
    ("builtins", "list"),
    ("builtins", "set"),
    ("builtins", "tuple"),
}
RECORDED = re.compile(r"^torch\.optim(\.[a-z_]+)*$")  # torch.optim.sgd.SGD, torch.optim.lr_scheduler.*


class PickledState:
    """A pickled optimiser or scheduler object of a Dassl checkpoint, kept as the record of its
    attributes (`state`) and its class's name: nothing of the class is imported or run."""

    pickled_class = ""

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.pickled_class} (pickled state)>"


_RECORDS: dict[str, type[PickledState]] = {}


def _record(path: str) -> type[PickledState]:
    if path not in _RECORDS:
        _RECORDS[path] = type(path.rpartition(".")[2], (PickledState,), {"pickled_class": path})
    return _RECORDS[path]


class RefusedGlobal(pickle.UnpicklingError):
    """A checkpoint that names a global this reader does not allow."""


class RestrictedUnpickler(pickle.Unpickler):
    """pickle's Unpickler that finds only what Dassl checkpoints hold (module docstring); torch.load
    uses it through `pickle_module` and still rebuilds the tensors from the file's storages."""

    def find_class(self, module: str, name: str) -> Any:
        # Python 2's names, as pickle's own find_class maps them (torch.save writes protocol 2)
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        path = f"{module}.{name}"
        allowed = _get_allowed_globals()  # torch's own list for tensors: rebuild functions, dtypes, storages
        if path in allowed:
            return allowed[path]
        if (module, name) in CONTAINERS:
            return super().find_class(module, name)
        if RECORDED.match(module) and name[:1].isupper():
            return _record(path)
        raise RefusedGlobal(f"it names {path}, which a Dassl checkpoint never holds")


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


# torch.load's `pickle_module`: every object of the file (also the legacy format's header) is
# unpickled by RestrictedUnpickler.
restricted_pickle = types.ModuleType("restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
restricted_pickle.load = _restricted_load  # type: ignore[attr-defined]
restricted_pickle.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]
restricted_pickle.__name__ = "restricted_pickle"


def is_dassl_checkpoint(path: str | Path) -> bool:
    """Whether `path` names a Dassl checkpoint, or an output folder (or a model's folder in it) that
    holds one, rather than this project's prompt.pt or run folder."""
    path = Path(path)
    if path.is_dir():
        return _model_files(path) != []
    return path.name == BEST or EPOCH_FILE.match(path.name) is not None


def _model_files(folder: Path) -> list[Path]:
    """The checkpoint files of a model folder or of the model folders of an output folder."""
    folders = [folder, *sorted(p for p in folder.iterdir() if p.is_dir())] if folder.is_dir() else []
    found = []
    for candidate in folders:
        files = [
            f for f in candidate.iterdir() if f.is_file() and (f.name == BEST or EPOCH_FILE.match(f.name))
        ]
        if files:
            found.append(candidate)
    return found


def dassl_file(path: str | Path) -> Path:
    """The checkpoint file `path` names: itself, or in a Dassl output folder (or a model's folder in
    it) the file Dassl's `load_model` reads by default, model-best.pth.tar, else the last epoch's."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise ValueError(f"ckpt={path}: no such file or folder; {FIX}")
    folders = _model_files(path)
    if not folders:
        raise ValueError(f"ckpt={path}: this folder holds no {BEST} or model.pth.tar-<epoch>; {FIX}")
    if len(folders) > 1:
        names = ", ".join(str(f) for f in folders)
        raise ValueError(f"ckpt={path}: several models have checkpoints here ({names}): give one of them")
    folder = folders[0]
    if (folder / BEST).is_file():
        return folder / BEST
    epochs = {int(m[1]): f for f in folder.iterdir() if (m := EPOCH_FILE.match(f.name))}
    return epochs[max(epochs)]


def dassl_output_folder(path: str | Path) -> Path:
    """The output folder of a Dassl checkpoint (`<output>/<model>/<file>` or its folders): where
    what is written "beside the prompt" goes."""
    file = dassl_file(path)
    return file.parent.parent


def read_dassl(path: str | Path) -> dict[str, Any]:
    """The checkpoint `path` names (`dassl_file`), its tensors on the CPU, read by the restricted
    unpickler: {"format": DASSL_FORMAT, "file", "state_dict", "epoch", ...}. ValueError, naming the
    file, for a file that is not one or that names anything else to unpickle."""
    file = dassl_file(path)
    try:
        with open(file, "rb") as f:
            data = f.read()
    except OSError as err:
        raise ValueError(f"ckpt={file}: cannot be read ({err.strerror or err}); {FIX}") from err
    try:
        checkpoint = torch.load(
            io.BytesIO(data), map_location="cpu", pickle_module=restricted_pickle, weights_only=False
        )
    except RefusedGlobal as err:
        raise ValueError(f"ckpt={file}: refused, not unpickled: {err}; {FIX}") from err
    except Exception as err:  # torch raises many kinds for a file that is no checkpoint
        raise ValueError(
            f"ckpt={file} is not a Dassl checkpoint ({type(err).__name__}: {err}); {FIX}"
        ) from err
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"ckpt={file} is not a Dassl checkpoint (no state_dict of tensors); {FIX}")
    # DataParallel's prefix, which Dassl's save_checkpoint removes (older files may keep it)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return {**checkpoint, "format": DASSL_FORMAT, "file": str(file), "state_dict": state}


def write_dassl(
    folder: str | Path, model_name: str, state_dict: dict[str, torch.Tensor], epoch: int, **extra: Any
) -> Path:
    """`state_dict` as Dassl's `save_model` writes it: `<folder>/<model_name>/model.pth.tar-<epoch>`,
    holding state_dict, epoch, optimizer, scheduler and val_result (None: what Dassl writes after its
    last epoch without validation; the optimiser's and scheduler's states are not kept), and the
    `checkpoint` file naming it, both written whole. `extra`: more keys, which Dassl's readers
    ignore."""
    model_dir = Path(folder) / model_name
    file = model_dir / f"model.pth.tar-{epoch}"
    checkpoint = {
        "state_dict": OrderedDict((k, v.detach().cpu().contiguous()) for k, v in state_dict.items()),
        "epoch": epoch,
        "optimizer": None,
        "scheduler": None,
        "val_result": None,
        **extra,
    }
    save_torch(file, checkpoint)
    atomic_write(model_dir / LATEST, lambda f: f.write(f"{file.name}\n".encode()))
    return file

"""Writing files (and folders) so that a crash never leaves a truncated one: write a temp one, then
rename."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Calls `write(f)` on a temporary file beside `path`, then renames it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_folder(folder: str | Path, fill: Callable[[Path], None]) -> Path:
    """`folder`, made once: `fill(tmp)` writes a temporary folder beside it, which is then renamed
    onto it, so a folder that exists is complete. A folder that exists is left as it is, and
    another process making the same folder at the same time is harmless (one rename wins)."""
    folder = Path(folder)
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        fill(tmp)
        os.rename(tmp, folder)
    except OSError:
        if not folder.is_dir():  # not the other process's win
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, data: Any) -> Path:
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode()))


def save_torch(path: str | Path, data: Any) -> Path:
    return atomic_write(path, lambda f: torch.save(data, f))

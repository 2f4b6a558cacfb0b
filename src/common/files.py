"""Writing files (and folders) so that a crash never leaves a truncated one: write a temp one, then
rename (or link, to create a file only where none exists). A write the system refuses (a full disk,
a file-size limit, a quota) is a `WriteError` naming the file and what to do; the temporary file is
removed, and the target keeps its previous contents."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


class WriteError(OSError):
    """A file the system would not let us write: its path, the system's reason, and what to do."""

    def __init__(self, path: Path, err: OSError) -> None:
        super().__init__(err.errno, err.strerror or str(err), str(path))
        self.message = (
            f"{path} could not be written ({err.strerror or err}): free space on its disk (or raise the "
            "file-size limit or quota) and run the same command again, or write elsewhere: "
            "paths.output_dir=<folder> (the feature cache: paths.cache_dir=<folder>)"
        )

    def __str__(self) -> str:
        return self.message


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Calls `write(f)` on a temporary file beside `path`, then renames it onto `path`."""
    path = Path(path)
    tmp = _written_beside(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def exclusive_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> bool:
    """Creates `path` complete, written by `write(f)`, unless it exists: False then, and `path` is
    left as it is. Of processes creating the same file at once, exactly one does (a hard link fails
    where its target exists; a rename would replace it)."""
    path = Path(path)
    tmp = _written_beside(path, write)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def _written_beside(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """A temporary file beside `path` (on its file system), written by `write(f)` and on disk."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except (PermissionError, FileNotFoundError):
        raise  # not a matter of space: the caller's checks name the folder
    except OSError as err:
        raise WriteError(path, err) from err
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise WriteError(path, err) from err
        raise
    return Path(tmp)


def unwritable(folder: str | Path) -> str | None:
    """Why files cannot be written in `folder` (made if missing), or None if they can; nothing is
    created to find out."""
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def check_output(path: str | Path, option: str) -> None:
    """Before the work whose result goes to the file `path`: ValueError naming `option` if that file
    could not be written."""
    reason = unwritable(Path(path).parent)
    if reason is not None:
        raise ValueError(f"{option}={path} cannot be written ({reason}): give another with {option}=<file>")


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
    # Serialised in memory first: torch's own writer turns the system's error (ENOSPC, EFBIG) into a
    # RuntimeError without its errno; written here, it is a WriteError naming the file.
    buffer = io.BytesIO()
    torch.save(data, buffer)
    return atomic_write(path, lambda f: f.write(buffer.getbuffer()))

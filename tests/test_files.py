"""Safe files: a writer killed mid-write leaves the previous complete file (or none), never a
truncated one under the real name; prompt files are read without unpickling code."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from src.common.files import atomic_folder, exclusive_write, save_torch, unwritable, write_json
from src.common.prompt_file import load_prompt

ROOT = Path(__file__).resolve().parents[1]

# Writes the first half of a real torch.save payload into the temporary file, says so, and waits
# to be killed: what a SIGKILL in the middle of torch.save leaves behind.
KILLED_WRITER = textwrap.dedent(
    """
    import io, sys, time
    import torch
    from src.common.files import atomic_write

    buffer = io.BytesIO()
    torch.save({"ctx": torch.full((256, 512), 2.0)}, buffer)
    data = buffer.getvalue()

    def half_then_wait(f):
        f.write(data[: len(data) // 2])
        f.flush()
        print("half written", flush=True)
        time.sleep(120)

    atomic_write(sys.argv[1], half_then_wait)
    """
)


@pytest.mark.parametrize("existing", [True, False], ids=["overwrite", "new"])
def test_a_killed_writer_leaves_the_old_file_or_none(tmp_path, existing):
    target = tmp_path / "prompt.pt"
    if existing:
        save_torch(target, {"ctx": torch.ones(3)})
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(target)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout.readline().strip() == "half written"
    writer.send_signal(signal.SIGKILL)
    assert writer.wait() == -signal.SIGKILL

    if existing:
        assert torch.equal(torch.load(target, weights_only=True)["ctx"], torch.ones(3))
    else:
        assert not target.exists()
    # the partial temporary file is hidden and named *.tmp, so no reader's pattern picks it up
    (stray,) = [p for p in tmp_path.iterdir() if p != target]
    assert stray.name.startswith(".prompt.pt.") and stray.suffix == ".tmp"
    assert sorted(tmp_path.glob("*.pt")) == ([target] if existing else [])
    save_torch(target, {"ctx": torch.zeros(2)})  # a later write is not disturbed by it
    assert torch.equal(torch.load(target, weights_only=True)["ctx"], torch.zeros(2))


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    write_json(target, {"test_acc": 50.0})
    with pytest.raises(TypeError):
        write_json(target, {"test_acc": object()})  # fails while serialising
    assert json.loads(target.read_text()) == {"test_acc": 50.0}
    assert os.listdir(tmp_path) == ["results.json"]


def test_a_folder_appears_complete_or_not_at_all(tmp_path):
    def fill(folder: Path) -> None:
        (folder / "a.txt").write_text("a")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_folder(tmp_path / "made", fill)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary
    atomic_folder(tmp_path / "made", lambda folder: (folder / "a.txt").write_text("a"))
    atomic_folder(tmp_path / "made", fill)  # made already: left as it is
    assert [p.name for p in tmp_path.iterdir()] == ["made"]
    assert (tmp_path / "made" / "a.txt").read_text() == "a"


def test_of_writers_creating_one_file_at_once_exactly_one_does(tmp_path):
    path = tmp_path / "claim" / "fingerprint.json"
    start = threading.Barrier(8, timeout=60)
    won: list[int] = []

    def claim(writer: int) -> None:
        def write(f) -> None:
            start.wait()  # every writer has its temporary file: all link at once
            f.write(json.dumps({"writer": writer, "padding": "x" * 100_000}).encode())

        if exclusive_write(path, write):
            won.append(writer)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and json.loads(path.read_text())["writer"] == won[0]  # whole, the winner's
    assert [p.name for p in path.parent.iterdir()] == ["fingerprint.json"]  # no temporary left
    assert not exclusive_write(path, lambda f: f.write(b"{}"))  # exists: left as it is
    assert json.loads(path.read_text())["writer"] == won[0]


def test_unwritable_says_why_without_creating_anything(tmp_path):
    assert unwritable(tmp_path / "new" / "folder") is None and not (tmp_path / "new").exists()
    (tmp_path / "a_file").write_text("")
    assert unwritable(tmp_path / "a_file" / "sub") == f"{tmp_path / 'a_file'} is a file"


def test_prompt_files_load_without_unpickling_code(tmp_path):
    path = tmp_path / "prompt.pt"
    torch.save({"format": 1, "ctx": torch.zeros(2, 4), "extra": Path("a pickled object")}, path)
    with pytest.raises(ValueError, match=r"prompt.pt is not a prompt file .*UnpicklingError.*training run"):
        load_prompt(path)
    path.write_text("not a torch file")
    with pytest.raises(ValueError, match="is not a prompt file of this project"):
        load_prompt(path)


def _file_size_limit(limit: int):
    """For a child process: files stop at `limit` bytes (EFBIG, as a full disk gives ENOSPC)."""

    def apply() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of the process dying
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_write_the_system_refuses_names_the_file_then_the_same_command_continues(tiny_overrides, tmp_path):
    """A full disk (here a file-size limit): one error line naming the file and what to do, no
    traceback, nothing half-written; once there is room the same command runs to its results."""
    run = tmp_path / "run"
    command = [
        sys.executable, "-m", "src.train", "dataset=oxford_pets", "shots=1", "trainer.max_epochs=1",
        *tiny_overrides, f"hydra.run.dir={run}", "hydra.output_subdir=null",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    root = Path(__file__).resolve().parents[1]
    full = subprocess.run(
        command, cwd=root, env=env, capture_output=True, text=True, timeout=300,
        preexec_fn=_file_size_limit(2048),
    )  # fmt: skip
    assert full.returncode == 2, full.stderr
    (line,) = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert f"{run}/fingerprint.json could not be written" in line and "free space" in line, line
    assert "Traceback" not in full.stderr
    assert not list(run.glob(".*.tmp")) and not (run / "fingerprint.json").exists()
    again = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert json.loads((run / "results.json").read_text())["num_test"] > 0

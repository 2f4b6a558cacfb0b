"""Resume: a run killed at any point and started again with the same command ends exactly as an
uninterrupted one; a changed configuration in the same folder is refused; checkpoints are written
atomically and read without unpickling code."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from src.run.resume import AtomicCheckpointIO, RunDirError, differences, fingerprint, prepare_run_dir
from src.run.training import train
from tests.conftest import make_cfg

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 20


def overrides(data_dir: Path, cache_dir: Path) -> list[str]:
    return [
        "model=tiny",
        "dataset=oxford_pets",
        "shots=4",
        "data.batch_size=4",  # 4 steps per epoch: the data order, drawn at random, matters
        "trainer=cpu",
        f"trainer.max_epochs={EPOCHS}",
        "trainer.check_val_every_n_epoch=7",
        # a resumed run replays the epochs since its last checkpoint: the same draws again
        "callbacks.model_checkpoint.every_n_epochs=3",
        "trainer.enable_progress_bar=false",
        "data.num_workers=0",
        f"paths.data_dir={data_dir}",
        f"paths.cache_dir={cache_dir}",
    ]


def checkpoint_epoch(path: Path) -> int | None:
    try:
        return torch.load(path, weights_only=True)["epoch"]
    except FileNotFoundError:  # not written yet (it appears whole: written beside and renamed)
        return None


def kill_after_first_checkpoint(run: subprocess.Popen, last: Path, signum: int = signal.SIGKILL) -> None:
    deadline = time.monotonic() + 300
    while checkpoint_epoch(last) is None and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    run.send_signal(signum)


def start_run(args: list[str], folder: Path, stderr: int = subprocess.DEVNULL) -> subprocess.Popen:
    """`python -m src.train <args>` into `folder`, with this process's float arithmetic (as many
    threads)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    command = [sys.executable, "-m", "src.train", *args, f"hydra.run.dir={folder}"]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)


def test_killed_run_resumes_to_the_same_context_and_accuracy(data_dir, cache_dir, tmp_path):
    args = overrides(data_dir, cache_dir)
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    run = start_run(args, killed)
    killer = threading.Thread(
        target=kill_after_first_checkpoint, args=(run, killed / "checkpoints" / "last.ckpt")
    )
    killer.start()
    uninterrupted = train(make_cfg(args, whole))  # meanwhile, in this process
    killer.join()
    assert run.wait() == -signal.SIGKILL
    stopped_at = checkpoint_epoch(killed / "checkpoints" / "last.ckpt")
    assert stopped_at is not None and stopped_at < EPOCHS - 2, "the run ended before it was killed"
    assert not (killed / "results.json").exists()

    resumed = train(make_cfg(args, killed))  # the same command again
    assert checkpoint_epoch(killed / "checkpoints" / "last.ckpt") == EPOCHS - 1
    ctx_whole = torch.load(whole / "prompt.pt", weights_only=True)["ctx"]
    ctx_resumed = torch.load(killed / "prompt.pt", weights_only=True)["ctx"]
    assert torch.allclose(ctx_resumed, ctx_whole, rtol=0, atol=1e-6)
    assert resumed["test_acc"] == uninterrupted["test_acc"]
    assert resumed["test_macro_acc"] == uninterrupted["test_macro_acc"]


def metrics(folder: Path) -> list[dict[str, str]]:
    with (folder / "csv" / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_a_run_stopped_by_sigterm_exits_143_then_resumes_with_its_whole_log(data_dir, cache_dir, tmp_path):
    """SIGTERM (a preemption, a time limit) mid-run: exit 143 and one line saying where it continues;
    the same command then ends as the run never stopped, csv/metrics.csv with every row."""
    args = [*overrides(data_dir, cache_dir), "trainer.max_epochs=12", "trainer.log_every_n_steps=2"]
    stopped, whole = tmp_path / "stopped", tmp_path / "whole"
    run = start_run(args, stopped, stderr=subprocess.PIPE)
    last = stopped / "checkpoints" / "last.ckpt"
    kill_after_first_checkpoint(run, last, signal.SIGTERM)
    uninterrupted = train(make_cfg(args, whole))  # meanwhile, in this process
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 128 + signal.SIGTERM, stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert "stopped by SIGTERM" in line and f"{last} holds epoch" in line and "same command continues" in line
    assert "Traceback" not in stderr and not (stopped / "results.json").exists()

    resumed = train(make_cfg(args, stopped))  # the same command again
    assert resumed["test_acc"] == uninterrupted["test_acc"]
    ctx = [torch.load(folder / "prompt.pt", weights_only=True)["ctx"] for folder in (stopped, whole)]
    assert torch.allclose(*ctx, rtol=0, atol=1e-6)
    rows, expected = metrics(stopped), metrics(whole)
    assert [row["step"] for row in rows] == [row["step"] for row in expected]
    for row, reference in zip(rows, expected, strict=True):
        assert row.keys() == reference.keys()
        for key, value in reference.items():
            assert (float(row[key]) if row[key] else None) == pytest.approx(float(value) if value else None)


def test_a_changed_config_is_refused_in_the_same_folder(tiny_overrides, tmp_path):
    base = ["dataset=oxford_pets", *tiny_overrides]
    assert prepare_run_dir(make_cfg([*base, "trainer.max_epochs=4"], tmp_path), tmp_path) is None
    stored = json.loads((tmp_path / "fingerprint.json").read_text())["config"]
    assert stored["trainer.max_epochs"] == 4 and stored["method.optimizer.lr"] == 0.002
    # settings that do not change what a run computes may differ
    same = make_cfg(
        [*base, "trainer.max_epochs=4", "data.num_workers=3", "trainer.enable_progress_bar=true"], tmp_path
    )
    assert prepare_run_dir(same, tmp_path) is None
    with pytest.raises(RunDirError) as error:
        prepare_run_dir(make_cfg([*base, "trainer.max_epochs=6", "seed=2"], tmp_path), tmp_path)
    message = str(error.value)
    assert "\n" not in message and str(tmp_path) in message
    assert "seed: 1 -> 2" in message and "trainer.max_epochs: 4 -> 6" in message
    assert "hydra.run.dir=" in message and "delete" in message


def test_fingerprint_ignores_where_files_are():
    from omegaconf import OmegaConf

    def cfg(data: str, out: str):
        return OmegaConf.create(
            {
                "paths": {"data_dir": data, "output_dir": out},
                "dataset": {"root": "${paths.data_dir}/pets"},
                "data": {"num_workers": 4, "batch_size": 32},
                "logger": {"csv": {"save_dir": "${paths.output_dir}"}},
            }
        )

    a, b = fingerprint(cfg("/a", "/x")), fingerprint(cfg("/b", "/y"))
    assert (
        a
        == b
        == {
            "paths.data_dir": "<paths.data_dir>",
            "paths.output_dir": "<paths.output_dir>",
            "dataset.root": "<paths.data_dir>/pets",
            "data.batch_size": 32,
        }
    )
    assert (
        differences(a, {**a, "data.batch_size": 16, "new": True})
        == "data.batch_size: 32 -> 16, new: (unset) -> true"
    )


def test_an_unwritable_output_folder_is_refused_before_training(tiny_overrides, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = blocker / "run"
    cfg = make_cfg(["dataset=oxford_pets", *tiny_overrides], out)
    with pytest.raises(RunDirError, match=r"paths.output_dir=.*a_file/run is not writable.*hydra.run.dir="):
        train(cfg)


def test_checkpoints_are_written_atomically_and_loaded_weights_only(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"epoch": 3, "state_dict": {"w": torch.ones(2)}}, path)
    assert io.load_checkpoint(path)["epoch"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]

    def interrupted(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"epoch": 4}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["epoch"] == 3  # the previous checkpoint, whole
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]

    torch.save({"epoch": 5, "code": Path("pickled")}, path)  # a pickled object, not plain data
    with pytest.raises(RunDirError, match="holds more than tensors and plain data") as refused:
        io.load_checkpoint(path)
    assert "weights_only" not in str(refused.value) and "\n" not in str(refused.value)


def test_a_folder_started_before_the_methods_moved_continues(tmp_path):
    """A folder whose fingerprint names the former module paths (src.models.coop.CoOp) and keys
    (method.fit) holds the same configuration: the run continues, as before the move."""
    cfg = make_cfg(["dataset=oxford_pets", "model=tiny", "method=kgcoop"], tmp_path)
    current = fingerprint(cfg)
    former = {
        k: v.replace("methods", "models") if isinstance(v, str) and k.startswith("method.module") else v
        for k, v in current.items()
    }  # (the schedules came to src.methods later, with the recipes: tests/test_recipes.py)
    former["method.fit"] = True
    assert former["method.module._target_"] == "src.models.kgcoop.KgCoOp"
    (tmp_path / "fingerprint.json").write_text(json.dumps({"config": former}))
    assert prepare_run_dir(cfg, tmp_path) is None  # not refused: nothing differs
    (tmp_path / "fingerprint.json").write_text(json.dumps({"config": {**former, "seed": 2}}))
    with pytest.raises(RunDirError, match="seed: 2 -> 1"):
        prepare_run_dir(cfg, tmp_path)


def test_a_folder_started_before_the_run_machinery_moved_continues(tmp_path):
    """A folder whose fingerprint names the callbacks' and plugins' former paths (src.resume.*,
    src.callbacks.*, src.cluster.*, before src/run/) holds the same configuration."""
    cfg = make_cfg(["dataset=oxford_pets", "model=tiny"], tmp_path)
    current = fingerprint(cfg)
    former = {k: v.replace("src.run.", "src.") if isinstance(v, str) else v for k, v in current.items()}
    moved = {k: v for k, v in former.items() if v != current[k]}
    assert {moved[k] for k in moved} >= {
        "src.resume.PeriodicCheckpoint",
        "src.resume.RandomState",
        "src.callbacks.StopOnNonFiniteLoss",
        "src.cluster.lightning_plugins",
    }
    (tmp_path / "fingerprint.json").write_text(json.dumps({"config": former}))
    assert prepare_run_dir(cfg, tmp_path) is None  # not refused: nothing differs


def test_two_runs_started_together_in_one_folder_one_trains(tiny_overrides, tmp_path, monkeypatch):
    """Both pass their checks while the folder is unclaimed, then claim it at the same moment:
    exactly one trains, the other refuses, naming the setting that differs."""
    import src.run.training

    claim, together = src.run.training.prepare_run_dir, threading.Barrier(2, timeout=120)

    def claim_together(cfg, out):
        together.wait()
        return claim(cfg, out)

    monkeypatch.setattr(src.run.training, "prepare_run_dir", claim_together)
    args = ["dataset=oxford_pets", *tiny_overrides, "shots=1", "trainer.max_epochs=1"]
    cfgs = {seed: make_cfg([*args, f"seed={seed}"], tmp_path) for seed in (1, 2)}
    outcomes: dict[int, object] = {}

    def start(seed: int) -> None:
        try:
            outcomes[seed] = train(cfgs[seed])
        except Exception as err:
            outcomes[seed] = err

    runs = [threading.Thread(target=start, args=(seed,)) for seed in (1, 2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    (refused,) = [seed for seed, outcome in outcomes.items() if isinstance(outcome, RunDirError)]
    (trained,) = {1, 2} - {refused}
    assert f"seed: {trained} -> {refused}" in str(outcomes[refused])
    assert json.loads((tmp_path / "results.json").read_text())["seed"] == trained == outcomes[trained]["seed"]


def test_a_checkpoint_without_the_methods_tensors_is_refused_on_resume(tiny_overrides, tmp_path):
    """A Lightning checkpoint of another method (or version) in the run's folder: loaded
    non-strictly, its missing tensors would silently stay as initialised."""
    args = ["dataset=oxford_pets", *tiny_overrides, "shots=1", "trainer.max_epochs=2"]
    cfg = make_cfg(args, tmp_path)
    train(cfg)
    (tmp_path / "results.json").unlink()
    last = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    del checkpoint["state_dict"]["prompt_learner.ctx"]
    torch.save(checkpoint, last)
    with pytest.raises(ValueError, match=r"last.ckpt does not fit src.methods.coop.CoOp \(it lacks "):
        train(cfg)


def test_a_damaged_fingerprint_is_refused(tiny_overrides, tmp_path):
    (tmp_path / "fingerprint.json").write_text('{"config": ')
    with pytest.raises(RunDirError, match="fingerprint.json is not a run's fingerprint"):
        prepare_run_dir(make_cfg(["dataset=oxford_pets", *tiny_overrides], tmp_path), tmp_path)

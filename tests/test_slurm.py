"""SLURM through `hydra/launcher=slurm`, on a real cluster: a sweep of two runs, one of which is
requeued while it trains and resumes from its checkpoint, a packed sweep (`pack=true`: one SLURM
job per pack), a hyper-parameter search (its trials, then the test of the chosen one, as jobs),
and a job the cluster refuses, reported in one line. Needs a running cluster
(`sudo make slurm-up` starts a one-node one on this machine); without one these tests are skipped,
saying so. What sbatch's refusals mean is tested without one."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from submitit.core.utils import FailedJobError

from src.run.cli import user_error
from src.run.config import as_hydra_overrides
from src.train import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def slurm() -> None:
    try:
        info = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired) as err:
        pytest.skip(
            f"SLURM tests skipped: no SLURM cluster answers ({err}); start one with `sudo make slurm-up`"
        )
    states = info.stdout.split()
    if info.returncode != 0 or not {"idle", "mix", "alloc"} & set(states):
        pytest.skip(
            f"SLURM tests skipped: sinfo found no usable node ({info.stderr.strip() or states}); "
            "start a one-node cluster with `sudo make slurm-up`"
        )


def wait_for(condition: Callable[[], bool], what: str, process: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the sweep ended before {what}:\n{process.stdout.read()[-3000:]}")
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def array_task(sweep: Path, index: int) -> str:
    """The SLURM id (`<array>_<index>`) of a sweep's run, from submitit's folder of that job."""
    names = [p.name for p in (sweep / ".submitit").glob(f"*_{index}")]
    return next(name for name in names if re.fullmatch(rf"\d+_{index}", name))


def test_sweep_on_slurm_with_a_requeued_run_that_resumes(slurm, data_dir, tmp_path):
    sweep = tmp_path / "sweep"
    command = [
        sys.executable,
        "-m",
        "src.train",
        "-m",
        "experiment=fewshot_grid",  # narrowed to one setting below
        "dataset=oxford_pets",
        "shots=2",
        "seed=1",
        "method=coop",
        "ctx=unified",
        "ctx.class_token_position=end",
        # two runs of the same training in two folders: `a` is requeued, `b` runs through
        "+copy=a,b",
        "hydra.sweep.subdir=run_${copy}",
        f"hydra.sweep.dir={sweep}",
        "model=tiny",
        "trainer=cpu",
        "trainer.max_epochs=60",
        f"paths.data_dir={data_dir}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "data.num_workers=0",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=null",
        "hydra.launcher.gpus_per_node=null",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=null",
        "hydra.launcher.timeout_min=10",
        'hydra.launcher.setup=["export OMP_NUM_THREADS=1"]',
    ]
    sweep_run = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    job = None
    try:
        run_a = sweep / "run_a"
        wait_for((run_a / "checkpoints" / "last.ckpt").exists, "run a's first checkpoint", sweep_run, 300)
        job = array_task(sweep, 0)
        assert not (run_a / "results.json").exists(), "run a ended before the requeue: train it longer"
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)

        # SLURM holds a requeued job for two minutes before it may start again: start it now.
        def pending() -> bool:
            state = ["squeue", "-h", "-j", job, "-o", "%T"]
            return (
                subprocess.run(state, capture_output=True, text=True, timeout=30).stdout.strip() == "PENDING"
            )

        wait_for(pending, "the requeued job to be pending", sweep_run, 120)
        subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True, timeout=30)
        output, _ = sweep_run.communicate(timeout=400)
    finally:
        if sweep_run.poll() is None:
            sweep_run.kill()
            if job is not None:
                subprocess.run(["scancel", job.split("_")[0]], timeout=30)
    assert sweep_run.returncode == 0, output[-3000:]

    a, b = (json.loads((sweep / f"run_{copy}" / "results.json").read_text()) for copy in "ab")
    assert a["epochs"] == 60 and a["method"] == "coop"
    a.pop("train_time_s"), b.pop("train_time_s")
    assert a == b  # the same accuracy and settings as the run that was never interrupted
    ctx_a, ctx_b = (torch.load(sweep / f"run_{c}" / "prompt.pt", weights_only=True)["ctx"] for c in "ab")
    assert torch.equal(ctx_a, ctx_b)
    log_a = (run_a / "train.log").read_text()
    assert f"resuming from {run_a / 'checkpoints' / 'last.ckpt'}" in log_a
    assert "resuming from" not in (sweep / "run_b" / "train.log").read_text()


def test_a_packed_sweep_is_one_slurm_job_per_pack(slurm, cache_dir, tmp_path):
    """pack=true on SLURM: the runs of a pack are one job of the array, each run's folder its own."""
    sweep = tmp_path / "sweep"
    command = [
        sys.executable,
        "-m",
        "src.train",
        "-m",
        "model=tiny_pretrained",  # weights from a file: the seeds pack together
        "dataset=digits",
        "trainer=cpu",
        "trainer.max_epochs=2",
        "shots=1",
        "seed=1,2",
        "ctx=unified,class_specific",
        "pack=true",
        f"paths.cache_dir={cache_dir}",
        "data.num_workers=0",
        f"hydra.sweep.dir={sweep}",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=null",
        "hydra.launcher.gpus_per_node=null",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=null",
        "hydra.launcher.timeout_min=10",
        'hydra.launcher.setup=["export OMP_NUM_THREADS=1"]',
    ]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert "pack=true: 4 runs in 1 packs" in run.stdout + run.stderr
    results = sorted(sweep.glob("digits/coop/*/shots1/seed*/results.json"))
    assert len(results) == 4
    assert all(json.loads(path.read_text())["pack_size"] == 4 for path in results)
    assert len(list(sweep.glob(".submitit/*/*_log.out"))) == 1  # one SLURM job: the pack


def test_a_search_on_slurm_launches_its_trials_then_the_test_of_the_chosen_one(slurm, cache_dir, tmp_path):
    """hparams_search=coop_optuna on SLURM: the two trials as one job array (n_jobs=2), then one job
    that tests the trial of the higher validation accuracy; best.json holds its test accuracy."""
    sweep = tmp_path / "search"
    command = [
        sys.executable,
        "-m",
        "src.train",
        "-m",
        "hparams_search=coop_optuna",
        "experiment=quickstart",
        "baseline=null",
        "shots=1",
        "trainer.max_epochs=choice(1,2)",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",
        f"paths.cache_dir={cache_dir}",
        f"hydra.sweep.dir={sweep}",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=null",
        "hydra.launcher.gpus_per_node=null",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=null",
        "hydra.launcher.timeout_min=10",
        'hydra.launcher.setup=["export OMP_NUM_THREADS=1"]',
    ]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    trials = json.loads((sweep / "search.json").read_text())["trials"]
    best = json.loads((sweep / "best.json").read_text())
    assert [t["state"] for t in trials] == ["complete", "complete"]
    assert best["val_acc"] == max(t["val_acc"] for t in trials)
    assert best["test_acc"] == json.loads((sweep / best["runs"][0] / "results.json").read_text())["test_acc"]
    other = next(t for t in trials if t["trial"] != best["trial"])
    assert not (sweep / other["dir"] / "seed1/results.json").exists()
    assert len(list(sweep.glob(".submitit/*/*_log.out"))) == 3  # two trials, one test


def test_a_job_the_cluster_refuses_is_one_line_naming_the_option(slurm, cli, capsys, tmp_path):
    """The local cluster has no GPUs: sbatch refuses --gpus-per-node=1 before anything runs."""
    args = ["-m", "experiment=quickstart", f"hydra.sweep.dir={tmp_path}", "hydra/launcher=slurm"]
    with pytest.raises(SystemExit) as exit_info:
        cli(main, as_hydra_overrides([*args, "hydra.launcher.gpus_per_node=1"]))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: sbatch refused the job (--gpus-per-node=1): Invalid generic resource (gres) specification; "
        "change hydra.launcher.gpus_per_node (null on a cluster without GPUs)"
    ]


def refused(stderr: str, script: Path) -> FailedJobError:
    """What submitit raises when sbatch refuses `script`."""
    try:
        sbatch = subprocess.CalledProcessError(1, ["sbatch", str(script)], output="", stderr=stderr)
        raise FailedJobError(stderr) from sbatch
    except FailedJobError as err:
        return err


@pytest.mark.parametrize(
    ("stderr", "expected"),
    [
        (
            "sbatch: error: invalid partition specified: gpu\n"
            "sbatch: error: Batch job submission failed: Invalid partition name specified",
            "sbatch refused the job (--partition=gpu): invalid partition specified: gpu; Batch job "
            "submission failed: Invalid partition name specified; change hydra.launcher.partition (",
        ),
        (
            "sbatch: error: Memory specification can not be satisfied",
            "sbatch refused the job (--mem=32GB): Memory specification can not be satisfied; "
            "change hydra.launcher.mem_gb (",
        ),
        (
            "sbatch: error: Batch job submission failed: Requested time limit is invalid",
            "sbatch refused the job (--time=720): Batch job submission failed: Requested time limit is "
            "invalid; change hydra.launcher.timeout_min (",
        ),
        (
            "sbatch: error: Batch job submission failed: Requested node configuration is not available",
            "sbatch refused the job: Batch job submission failed: Requested node configuration is not "
            "available; change hydra.launcher.gpus_per_node, cpus_per_task or mem_gb (",
        ),
        (
            "sbatch: error: Batch job submission failed: something new",
            "sbatch refused the job: Batch job submission failed: something new; change the "
            "hydra.launcher.* option that asks for it (conf/hydra/launcher/slurm.yaml;",
        ),
    ],
    ids=["partition", "memory", "time", "node", "unknown"],
)
def test_what_sbatch_refused_and_the_option_that_changes_it(stderr, expected, tmp_path):
    script = tmp_path / "submission_file.sh"  # as submitit writes it
    script.write_text("#!/bin/bash\n#SBATCH --mem=32GB\n#SBATCH --partition=gpu\n#SBATCH --time=720\n")
    message = user_error(refused(stderr, script))
    assert message.startswith(expected) and "\n" not in message
    assert user_error(FailedJobError("a job that failed while running")) is None  # a bug: its traceback

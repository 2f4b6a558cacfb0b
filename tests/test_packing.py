"""Packed runs (`pack=true`): runs of a sweep that differ only in seed and context train as one job
and each equals the same run trained alone (few-shot images, data order and augmentation bit for
bit, context within 1e-5, test accuracy), on images and on cached features; a killed pack resumes
(in a pack or alone) to the contexts of an uninterrupted one; a finished run is not trained again;
the sweeper groups a grid's jobs into packs and launches the rest alone; a packed multirun writes
every run's folder as unpacked runs do, through the local and submitit launchers."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from hydra_plugins.coop_grid_sweeper.grid_sweeper import drop_repeats
from src.methods.coop import CoOp
from src.packing import module as packing
from src.packing.jobs import PACKED_RUNS, group_jobs, member_overrides, packed_jobs
from src.packing.module import packed_loss_terms
from src.packing.refusal import pack_refusal
from src.packing.train import train_packed
from src.report import write_report
from src.run.callbacks import NonFiniteLossError
from src.run.cli import FailedRuns
from src.run.config import as_hydra_overrides
from src.run.training import train
from src.train import main
from tests.conftest import CONF_DIR, make_cfg

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 4
# Three runs of two seeds, unified and class-specific contexts, the class name at the end and in
# the middle: two stacks of prompts, two few-shot sets (seed 1's shared by two runs).
RUNS = [
    ["seed=1", "ctx=unified"],
    ["seed=2", "ctx=class_specific"],
    ["seed=1", "ctx=class_specific", "ctx.class_token_position=middle"],
]
# data.in_memory_max_gb: one 2-shot set of 32 px digits decoded (59 kB) fits, two would not: the
# pack decides for each set as the run alone does (each in memory), not for the pack's sets at once.
MODES = {
    "images": ["data.in_memory_max_gb=0.00008"],
    "features": ["data.train_views=2"],
}


@pytest.fixture(scope="module")
def digits(cache_dir: Path) -> list[str]:
    return [
        "model=tiny_pretrained",  # weights from a file: runs of several seeds share the backbone
        "dataset=digits",
        "trainer=cpu",
        f"paths.cache_dir={cache_dir}",
        "data.num_workers=0",
        "trainer.enable_progress_bar=false",
        "shots=2",
        "data.batch_size=4",  # 5 steps per epoch: the data order matters
        f"trainer.max_epochs={EPOCHS}",
        "ctx.n_ctx=4",
        "callbacks.model_checkpoint.every_n_epochs=2",
        "trainer.check_val_every_n_epoch=2",
        "trainer.log_every_n_steps=3",
    ]


@pytest.fixture(scope="module", params=list(MODES))
def alone(request, digits, tmp_path_factory) -> tuple[str, list[str], Path]:
    """Each run of RUNS trained alone: (mode, its overrides, the folder holding run0, run1, run2)."""
    mode = request.param
    root = tmp_path_factory.mktemp(f"alone_{mode}")
    for index, run in enumerate(RUNS):
        train(make_cfg([*digits, *MODES[mode], *run], root / f"run{index}"))
    return mode, [*digits, *MODES[mode]], root


def configs(overrides: list[str], root: Path) -> list:
    return [make_cfg([*overrides, *run], root / f"run{index}") for index, run in enumerate(RUNS)]


def context(folder: Path) -> torch.Tensor:
    return torch.load(folder / "prompt.pt", weights_only=True)["ctx"]


def checkpoint(folder: Path) -> dict:
    return torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)


def metrics(folder: Path) -> list[dict[str, str]]:
    with (folder / "csv" / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def assert_same_run(packed: Path, alone: Path) -> None:
    """The same few-shot images, random stream (bit for bit), context, accuracy, results and logs."""
    assert (packed / "fewshot.json").read_bytes() == (alone / "fewshot.json").read_bytes()
    stream = [checkpoint(folder)["callbacks"]["RandomState"]["torch"] for folder in (packed, alone)]
    assert torch.equal(*stream)  # every draw of the data order and augmentation was the same
    torch.testing.assert_close(context(packed), context(alone), rtol=0, atol=1e-5)
    results = [json.loads((folder / "results.json").read_text()) for folder in (packed, alone)]
    for result in results:
        result.pop("train_time_s")
    assert results[0].pop("pack_size") >= 2
    assert results[0] == results[1]  # test accuracy and every setting
    rows = [metrics(folder) for folder in (packed, alone)]
    assert [r.keys() for r in rows[0]] == [r.keys() for r in rows[1]]
    for packed_row, alone_row in zip(*rows, strict=True):
        assert [k for k, v in packed_row.items() if v] == [k for k, v in alone_row.items() if v]
        for key, value in alone_row.items():
            if value:
                assert float(packed_row[key]) == pytest.approx(float(value), rel=1e-5, abs=1e-6), key


def test_packed_runs_equal_the_runs_trained_alone(alone, tmp_path, caplog):
    mode, overrides, reference = alone
    with caplog.at_level("INFO"):
        results = train_packed(configs(overrides, tmp_path))
    assert [r["pack_size"] for r in results] == [3, 3, 3]
    for index in range(len(RUNS)):
        assert_same_run(tmp_path / f"run{index}", reference / f"run{index}")
    assert "3 runs share 2 few-shot train sets" in caplog.text
    if mode == "images":  # each set within data.in_memory_max_gb, decided per set as alone
        assert caplog.text.count("training images decoded once and kept in memory") == 2
        assert "train images read from disk every epoch" not in caplog.text


def test_a_method_with_a_loss_term_of_its_own_packs_and_equals_its_runs_alone(digits, tmp_path):
    """KgCoOp (CoOp's step plus its `kg` term on the text features): packed, each run is the run
    trained alone, the logged terms (train/ce, train/kg) included."""
    overrides = [*digits, *MODES["features"], "method=kgcoop", "ctx.init=null"]
    runs = RUNS[:2]
    for index, run in enumerate(runs):
        train(make_cfg([*overrides, *run], tmp_path / "alone" / f"run{index}"))
    packed = [
        make_cfg([*overrides, *run], tmp_path / "packed" / f"run{index}") for index, run in enumerate(runs)
    ]
    assert [r["pack_size"] for r in train_packed(packed)] == [2, 2]
    for index in range(len(runs)):
        assert_same_run(tmp_path / "packed" / f"run{index}", tmp_path / "alone" / f"run{index}")
        assert {"train/ce", "train/kg"} <= set(metrics(tmp_path / "packed" / f"run{index}")[0])


class Killed(RuntimeError):
    """Stands for the process being killed: what is on disk stays, nothing else."""


def test_a_killed_pack_resumes_to_the_contexts_of_an_uninterrupted_one(alone, tmp_path, monkeypatch):
    """Killed while writing its checkpoints after the last epoch (run 0's written, runs 1 and 2
    still at epoch 2 of 4): run 0 is tested, run 1 continues in a pack and run 2 alone
    (pack=false), each to the context and accuracy of the run never interrupted."""
    mode, overrides, reference = alone
    written = []
    save = packing.save_torch

    def killed_after_the_fourth(path, data):
        if len(written) == 4:  # epoch 2's three, then epoch 4's first
            raise Killed
        save(path, data)
        written.append(path)

    monkeypatch.setattr(packing, "save_torch", killed_after_the_fourth)
    with pytest.raises(Killed):
        train_packed(configs(overrides, tmp_path))
    monkeypatch.undo()
    assert [checkpoint(tmp_path / f"run{i}")["epoch"] for i in range(3)] == [3, 1, 1]
    assert not any((tmp_path / f"run{i}" / "results.json").exists() for i in range(3))

    train(make_cfg([*overrides, *RUNS[2]], tmp_path / "run2"))  # the same run, launched with pack=false
    results = train_packed(configs(overrides, tmp_path))
    assert [r["pack_size"] for r in results[:2]] == [1, 1] and "pack_size" not in results[2]
    for index in range(len(RUNS)):
        torch.testing.assert_close(
            context(tmp_path / f"run{index}"), context(reference / f"run{index}"), rtol=0, atol=1e-5
        )
        expected = json.loads((reference / f"run{index}" / "results.json").read_text())
        assert results[index]["test_acc"] == expected["test_acc"]


def test_a_run_whose_loss_is_not_finite_stops_and_the_others_finish(alone, tmp_path, monkeypatch):
    """As StopOnNonFiniteLoss stops a run alone: that run has no results, the pack's others are
    their runs alone, and the pack fails naming it."""
    mode, overrides, reference = alone
    steps = []

    def second_run_diverges(clip, modules, keys, batches):
        terms = packed_loss_terms(clip, modules, keys, batches)
        steps.append(len(terms))
        diverged = [{name: term * float("inf") for name, term in run.items()} for run in terms]
        return [diverged[i] if i == 1 and len(steps) == 3 else run for i, run in enumerate(terms)]

    monkeypatch.setattr(packing, "packed_loss_terms", second_run_diverges)
    with pytest.raises(NonFiniteLossError, match=r"1 of the pack's 3 runs stopped, the others .*run1"):
        train_packed(configs(overrides, tmp_path))
    assert steps[3:] and all(count == 2 for count in steps[3:])  # run1 trained no more
    assert not (tmp_path / "run1" / "results.json").exists()
    for index in (0, 2):
        assert_same_run(tmp_path / f"run{index}", reference / f"run{index}")


@pytest.mark.parametrize("alone", ["features"], indirect=True)  # one mode is enough
def test_a_run_that_fails_its_checks_leaves_the_others_to_train(alone, tmp_path):
    """One invalid member (a context of 0 vectors): the pack's other runs train and write their
    results, each its run alone; then the failed run is named, as a sweep names a run that fails."""
    _, overrides, reference = alone
    cfgs = configs(overrides, tmp_path)
    cfgs[1] = make_cfg([*overrides, *RUNS[1], "ctx.n_ctx=0"], tmp_path / "run1")
    with pytest.raises(FailedRuns) as failed:
        train_packed(cfgs)
    assert str(failed.value).splitlines() == [
        f"run {tmp_path / 'run1'}: ctx.n_ctx=0: the context needs at least 1 vector",
        "1 of 3 runs failed; the other 2 kept their results",
    ]
    assert not (tmp_path / "run1" / "fingerprint.json").exists()  # unclaimed: the corrected run trains there
    for index in (0, 2):
        assert_same_run(tmp_path / f"run{index}", reference / f"run{index}")


@pytest.mark.parametrize("alone", ["features"], indirect=True)  # one mode is enough
def test_a_run_that_has_results_is_not_trained_again(alone, tmp_path, caplog):
    _, overrides, reference = alone
    shutil.copytree(reference / "run1", tmp_path / "run1")  # finished before, alone
    finished = (tmp_path / "run1" / "results.json").stat().st_mtime_ns
    with caplog.at_level("INFO"):
        results = train_packed(configs(overrides, tmp_path))
    assert "run1/results.json exists: skipping this run" in caplog.text
    assert (tmp_path / "run1" / "results.json").stat().st_mtime_ns == finished
    assert results[1] == json.loads((reference / "run1" / "results.json").read_text())
    assert [results[0]["pack_size"], results[2]["pack_size"]] == [2, 2]
    for index in (0, 2):
        assert_same_run(tmp_path / f"run{index}", reference / f"run{index}")


def sweep_jobs(overrides: list[str]) -> tuple[list[list[str]], object]:
    """The jobs of `python -m src.train -m <overrides>` and a function composing a job's config."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        master = compose("train", overrides=[*overrides, "dataset=textile"], return_hydra_config=True)
    sweeper = master.hydra.sweeper
    params = [f"{key}={values}" for key, values in (sweeper.get("params") or {}).items()]
    (jobs,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)
    jobs = drop_repeats(jobs, sweeper.get("once") or {})

    def compose_job(job: list[str]):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose("train", overrides=[*overrides, *job], return_hydra_config=True)  # as the sweeper

    return jobs, compose_job


def test_the_quickstart_grid_packs_seeds_and_contexts_per_shot_count(caplog):
    jobs, compose_job = sweep_jobs(["experiment=quickstart_grid"])
    assert len(jobs) == 46
    with caplog.at_level("INFO"):
        launched = group_jobs(jobs, compose_job, pack_size=12)
    packs = [job for job in launched if any(o.startswith(f"+{PACKED_RUNS}=") for o in job)]
    assert len(packs) == 5 and len(launched) == 5 + 15 + 1  # the linear probes and zero-shot alone
    for pack in packs:
        members = member_overrides(pack)
        assert len(members) == 6  # seeds 1-3 x {unified, class-specific} of one shot count
        assert {tuple(m) for m in members} <= {tuple(job) for job in jobs}
        assert len({next(o for o in m if o.startswith("shots=")) for m in members}) == 1
    assert (
        "15 runs trained alone: method=linear_probe (LinearProbe) trains each run on its own" in caplog.text
    )
    assert "pack=true: 30 runs in 5 packs (pack_size=12); 21 jobs in all" in caplog.text
    assert len(group_jobs(jobs, compose_job, pack_size=4)) == 5 * 2 + 16  # packs of 4 and 2


def test_runs_of_random_weights_pack_within_a_seed(caplog):
    jobs, compose_job = sweep_jobs(["experiment=quickstart_grid", "model=tiny"])
    with caplog.at_level("INFO"):
        launched = group_jobs(jobs, compose_job, pack_size=12)
    packs = [member_overrides(job) for job in launched if f"+{PACKED_RUNS}" in job[-1]]
    assert len(packs) == 15  # shots x seeds, each {unified, class-specific}
    assert all(len({o for m in members for o in m if o.startswith("seed=")}) == 1 for members in packs)
    assert "model=coop-tiny has random weights, which depend on the seed" in caplog.text


def test_runs_named_by_hydras_job_are_not_packed(caplog):
    jobs, compose_job = sweep_jobs(["experiment=quickstart_grid", "hydra.sweep.subdir=${hydra.job.num}"])
    with caplog.at_level("INFO"):
        launched = group_jobs(jobs, compose_job, pack_size=12)
    assert sorted(launched) == sorted(jobs)  # each alone
    assert "30 runs trained alone: hydra.sweep.subdir=${hydra.job.num} names each run by" in caplog.text


def test_a_packed_job_carries_every_runs_settings():
    members = [
        ["shots='4'", "seed=1", "ctx.init='a photo of a'", "ctx.n_ctx=8"],
        ["shots='4'", "seed=2", 'ctx.init="it\'s a"', "ctx.n_ctx=16"],
        ["shots='4'", "seed=3", "ctx.init=null", "ctx.n_ctx=4"],
    ]
    (job,) = packed_jobs(members)
    assert job[:4] == members[0] and job[4].startswith(f"+{PACKED_RUNS}=[{{seed:'1',")
    assert member_overrides(job) == members
    parser = OverridesParser.create()
    parser.parse_overrides(job)  # a valid command line
    backslash = [["seed=1", "ctx.init=a\\"], ["seed=2", "ctx.init=b"]]
    assert member_overrides(packed_jobs(backslash)[0]) == backslash


def test_runs_the_pack_cannot_reproduce_are_refused(tmp_path):
    base = ["dataset=textile", "model=tiny"]
    assert pack_refusal(make_cfg(base, tmp_path)) is None
    assert pack_refusal(make_cfg([*base, "method=kgcoop"], tmp_path)) is None  # a loss term of its own
    refused = {
        "method=cocoop": "method=cocoop (CoCoOp) trains each run on its own",
        "method=prograd": "method=prograd (ProGrad) overrides on_before_optimizer_step, training_step",
        "method=tip_adapter": "(TipAdapter) trains each run on its own",
        "trainer=ddp_cpu": "several devices",
        "++trainer.max_steps=10": "trainer.max_steps=10: a pack trains every epoch whole",
        "++trainer.gradient_clip_val=1.0": "trainer.gradient_clip_val=1.0",
        "+callbacks.model_checkpoint.monitor=val/acc": "a checkpoint chosen by a metric",
        "trainer.precision=16-mixed": "fp16 scales each run's loss",
        "logger=wandb": "a logger other than the CSV log",
        "+callbacks.early.monitor=val/acc": "callbacks of their own",
    }
    for override, reason in refused.items():
        extra = (
            ["+callbacks.early._target_=pytorch_lightning.callbacks.EarlyStopping"]
            if "early" in override
            else []
        )
        assert reason in pack_refusal(make_cfg([*base, override, *extra], tmp_path)), override


class SmoothedCoOp(CoOp):
    """Changes CoOp's loss only: its runs pack (the pack calls the method's loss)."""

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=0.1)


class SteppedCoOp(CoOp):
    """Changes the training step itself, which a pack would not run."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return 2 * super().training_step(batch, batch_idx)


def test_a_subclass_that_changes_coops_training_step_is_not_packed(tmp_path):
    base = ["dataset=textile", "model=tiny"]
    target = "method.module._target_=tests.test_packing."
    assert pack_refusal(make_cfg([*base, target + "SmoothedCoOp"], tmp_path)) is None
    reason = pack_refusal(make_cfg([*base, target + "SteppedCoOp"], tmp_path))
    assert reason == (
        "method=coop (SteppedCoOp) overrides training_step, which a pack does not run: its runs train alone"
    )


def test_runs_that_differ_in_more_than_seed_and_context_are_not_packed(digits, tmp_path):
    cfgs = [
        make_cfg([*digits, "seed=1"], tmp_path / "a"),
        make_cfg([*digits, "seed=2", "shots=4"], tmp_path / "b"),
    ]
    with pytest.raises(ValueError, match=r"differ in more than seed, ctx.* \(shots: 2 -> 4\)"):
        train_packed(cfgs)


def folders(sweep: Path) -> list[Path]:
    return sorted(p.parent for p in sweep.glob("digits/coop/*/shots1/seed*/results.json"))


def test_a_packed_multirun_writes_each_runs_folder_then_the_report(cli, digits, tmp_path):
    """`-m ... pack=true` on the local launcher: one job for the four runs, each run's folder as an
    unpacked multirun writes it; launched again, nothing is trained."""
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        *[o for o in digits if not o.startswith(("shots=", "trainer.max_epochs"))],
        "shots=1",
        "trainer.max_epochs=2",
        "seed=1,2",
        "ctx=unified,class_specific",
        "pack=true",
        "hydra/sweeper=grid",
        f"hydra.sweep.dir={sweep}",
    ]
    args = as_hydra_overrides(args)  # as src.train's command line does
    cli(main, args)
    runs = folders(sweep)
    assert len(runs) == 4
    unpacked = tmp_path / "unpacked"
    cli(main, [a.replace(str(sweep), str(unpacked)).replace("pack=True", "pack=False") for a in args])
    for run, alone in zip(runs, folders(unpacked), strict=True):
        files = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}
        alone_files = {p.relative_to(alone).as_posix() for p in alone.rglob("*") if p.is_file()}
        assert files - {"train.log"} == alone_files - {"train.log"}  # in pytest Hydra may log elsewhere
        assert files >= {
            "results.json",
            "prompt.pt",
            "fewshot.json",
            "config.yaml",
            "fingerprint.json",
            "csv/metrics.csv",
            "csv/hparams.yaml",
            "checkpoints/last.ckpt",
            "train.log",
            ".hydra/config.yaml",
            ".hydra/overrides.yaml",
        }
        for name in ("config.yaml", ".hydra/config.yaml", ".hydra/overrides.yaml"):  # the run's own
            expected = (alone / name).read_text().replace(str(unpacked), str(sweep))
            expected = expected.replace("pack: false", "pack: true").replace("pack=False", "pack=True")
            assert (run / name).read_text() == expected, name
        assert json.loads((run / "results.json").read_text())["pack_size"] == 4
    written = [(run / "results.json").stat().st_mtime_ns for run in runs]
    cli(main, args)  # launched again: every run is done
    assert [(run / "results.json").stat().st_mtime_ns for run in runs] == written
    report = write_report(sweep).read_text()
    assert "Every setting has all seeds." in report and "| digits    | coop unified end M4 " in report


def test_one_submitit_job_per_pack(digits, tmp_path):
    """hydra/launcher=local (submitit, as on SLURM): each pack is one job, in a process of its own,
    and every run's folder gets its log."""
    sweep = tmp_path / "sweep"
    command = [
        sys.executable,
        "-m",
        "src.train",
        "-m",
        *[o for o in digits if not o.startswith(("shots=", "trainer.max_epochs"))],
        "shots=1,2",
        "trainer.max_epochs=2",
        "seed=1,2",
        "pack=true",
        "hydra/sweeper=grid",
        f"hydra.sweep.dir={sweep}",
        "hydra/launcher=local",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    runs = sorted(p.parent for p in sweep.glob("digits/coop/*/shots*/seed*/results.json"))
    assert len(runs) == 4
    assert len(list(sweep.glob(".submitit/*/*_log.out"))) == 2  # a pack per shot count
    for folder in runs:
        assert "a pack of 2 runs" in (folder / "train.log").read_text()

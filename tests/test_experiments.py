"""Experiment presets (conf/experiment/): the runs each launches, each run's config, one short run
per preset on the tiny model, and a narrowed grid through submitit, re-launched, then reported."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from hydra_plugins.coop_grid_sweeper.grid_sweeper import drop_context_repeats, drop_repeats
from src.methods.base import method_arguments, method_class
from src.models.clip import Architecture
from src.report import write_report
from src.run.config import compose_config
from src.run.training import train
from tests.conftest import CONF_DIR, make_cfg

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
# The number of runs each preset launches, as its README says.
RUNS = {
    "fewshot_grid": 836,
    "domain_generalization": 44,
    "cross_dataset": 7,
    "base_to_new": 77,
    "quickstart": 1,
    "noisy_labels": 275,
    "quickstart_textile": 1,
    "quickstart_grid": 46,
}
SINGLE_RUNS = {"quickstart", "quickstart_textile"}  # no sweep, no README of their own
# What the one-step runs replace: the tiny model, the miniature data, a CPU trainer.
TINY_KEYS = {"model", "dataset", "trainer"}


def sweep_runs(preset: str) -> list[list[str]]:
    """The overrides of each run that `python -m src.train -m experiment=<preset>` launches."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        # a dataset only to compose: a sweep's own dataset values come from its params
        cfg = compose(
            "train", overrides=[f"experiment={preset}", "dataset=textile"], return_hydra_config=True
        )
    sweeper = OmegaConf.to_container(cfg.hydra.sweeper)
    params = [f"{key}={values}" for key, values in (sweeper.get("params") or {}).items()]
    (runs,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)
    return drop_repeats(runs, sweeper.get("once") or {})


def test_presets_launch_the_runs_their_readmes_announce():
    assert set(PRESETS) == set(RUNS)
    for preset, count in RUNS.items():
        assert len(sweep_runs(preset)) == count, preset
        if preset not in SINGLE_RUNS:
            readme = (ROOT / "experiments" / preset / "README.md").read_text()
            assert f"{count} runs" in readme, preset
    for preset in RUNS:  # a fixed folder per study: launched again, a sweep finds its runs
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            overrides = [f"experiment={preset}", "dataset=textile"]
            sweep_dir = compose("train", overrides=overrides, return_hydra_config=True).hydra.sweep.dir
        assert preset in SINGLE_RUNS or sweep_dir == f"outputs/{preset}"
    grid = sweep_runs("fewshot_grid")
    zeroshot = [run for run in grid if "method=zeroshot" in run]
    assert len(zeroshot) == 11  # once per dataset, not per shots x seed x context
    assert all("shots='1'" in run and "seed=1" in run for run in zeroshot)
    assert sum("method=linear_probe" in run for run in grid) == 11 * 5 * 3
    coop = {tuple(run) for run in grid if "method=coop" in run}
    assert len(coop) == 11 * 5 * 3 * 2 * 2


def covering(runs: list[list[str]]) -> list[list[str]]:
    """A few runs in which every swept value appears at least once."""
    seen: set[str] = set()
    chosen = []
    for run in runs:
        if not set(run) <= seen:
            chosen.append(run)
            seen |= set(run)
    return chosen


@pytest.mark.parametrize("preset", PRESETS)
def test_every_swept_value_composes(preset, tmp_path):
    for run in covering(sweep_runs(preset)):
        cfg = make_cfg([f"experiment={preset}", *run], tmp_path)
        values = dict(override.split("=", 1) for override in run)
        assert cfg.dataset.name == values.get("dataset", cfg.dataset.name)
        assert cfg.method.name == values.get("method", cfg.method.name)
        assert cfg.shots == int(values.get("shots", str(cfg.shots)).strip("'"))
        assert cfg.trainer.max_epochs > 0


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_runs_a_step_on_the_tiny_model(preset, tiny_overrides, tmp_path):
    first = [o for o in sweep_runs(preset)[0] if o.split("=", 1)[0] not in TINY_KEYS]
    cfg = make_cfg(
        [
            f"experiment={preset}",
            *first,
            "dataset=oxford_pets",
            *tiny_overrides,
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=1",
            "+trainer.limit_val_batches=0",
        ],
        tmp_path,
    )
    results = train(cfg)
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert results["epochs"] == 1 and results["backbone"] == "coop-tiny"
    if preset == "base_to_new":
        assert results["subsample"] == "base" and results["num_classes"] == 2


def test_narrowed_grid_through_submitit_then_report(data_dir, tmp_path):
    """The grid on this machine (`hydra/launcher=local`), narrowed to 1-shot CoOp and zero-shot CLIP,
    each run in its own process; then the report of its folder."""
    sweep = tmp_path / "grid"
    command = [
        sys.executable,
        "-m",
        "src.train",
        "-m",
        "experiment=fewshot_grid",
        "dataset=oxford_pets",
        "shots=1",
        "seed=1",
        "method=coop,zeroshot",
        "ctx=unified",
        "ctx.class_token_position=end",
        "model=tiny",
        "trainer=cpu",
        "trainer.max_epochs=2",
        f"paths.data_dir={data_dir}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "data.num_workers=0",
        f"hydra.sweep.dir={sweep}",
        "hydra/launcher=local",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two runs at once on few cores
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(list(sweep.glob("oxford_pets/*/*/shots1/seed1/results.json"))) == 2
    assert len(list(sweep.glob(".submitit/*/*_log.out"))) == 2  # one process per run

    write_report(sweep)
    text = (sweep / "report" / "report.md").read_text()
    assert "| dataset     | variant              | zero-shot   | 1-shot   |" in text
    assert "| oxford_pets | coop unified end M16 |" in text and "| oxford_pets | zeroshot " in text
    assert "Every setting has all seeds." in text and "No run is duplicated." in text
    plots = {p.name for p in (sweep / "report" / "plots").glob("*.png")}
    assert plots == {"fewshot_coop-tiny_oxford_pets.png", "fewshot_coop-tiny_average.png"}


def test_a_relaunched_sweep_skips_finished_runs(tiny_overrides, tmp_path, caplog):
    cfg = make_cfg(["dataset=oxford_pets", "shots=1", "trainer.max_epochs=1", *tiny_overrides], tmp_path)
    first = train(cfg)
    written = (tmp_path / "results.json").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="src.run.training"):
        assert train(cfg) == first
    assert "results.json exists: skipping this run" in caplog.text
    assert (tmp_path / "results.json").stat().st_mtime_ns == written


def methods_digits_commands() -> list[tuple[str, list[str]]]:
    """(name, overrides) of each method line of experiments/methods_digits/run.sh, its shell
    variables expanded as the script expands them."""
    script = (ROOT / "experiments" / "methods_digits" / "run.sh").read_text()
    variables = dict(re.findall(r'^(\w+)="([^"$]*)"$', script, flags=re.MULTILINE))
    commands = []
    for line in script.splitlines():
        if line.startswith(("b2n ", "fewshot ")):
            words = shlex.split(re.sub(r"\$(\w+)", lambda m: variables[m[1]], line))
            commands.append((f"{words[0]} {words[1]}", [*variables["common"].split(), *words[2:]]))
    return commands


def test_the_methods_digits_script_runs_every_method_on_the_tiny_clip():
    """Each method line of the script composes and passes its method's checks against the tiny
    pre-trained CLIP (a depth beyond its 2 blocks, a misspelt key: this fails)."""
    commands = methods_digits_commands()
    assert len(commands) == 30  # 15 base-to-new, 15 few-shot
    architecture = Architecture.of("coop-tiny-narrow")
    for name, overrides in commands:
        cfg = compose_config("train", ["dataset=digits", *overrides])
        assert cfg.model.name == "coop-tiny-narrow", name
        method = method_class(cfg.method)
        method.check_config(method_arguments(method, cfg.method.module), architecture)


def test_a_method_that_takes_no_context_is_launched_once_per_context_sweep(tmp_path, caplog):
    """`-m method=clip_lora ctx=unified,class_specific seed=1,2`: its config takes nothing from the
    context, so each seed runs once (the log says so), into a folder named without a context; CoOp's
    runs, which differ by context, all run."""
    jobs = [
        [f"method={method}", f"ctx={ctx}", f"seed={seed}"]
        for method in ("clip_lora", "coop")
        for ctx in ("unified", "class_specific")
        for seed in (1, 2)
    ]
    with caplog.at_level("INFO"):
        kept = drop_context_repeats(jobs, lambda job: make_cfg(["dataset=oxford_pets", *job], tmp_path))
    assert kept == [job for job in jobs if job[0] == "method=coop" or job[1] == "ctx=unified"]
    assert "method=clip_lora takes nothing from the context: 2 runs" in caplog.text
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "train", overrides=["dataset=oxford_pets", "method=clip_lora"], return_hydra_config=True
        )
    assert cfg.hydra.run.dir.endswith("/clip_lora/RN50-quickgelu/shots16/seed1")  # no `_unified_m16_end`

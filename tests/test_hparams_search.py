"""Hyper-parameter searches (`-m hparams_search=coop_optuna`, hydra_plugins/coop_optuna_sweeper):
the search space read from Hydra's sweep syntax; a three-trial search on the quick start's data
that scores each trial by the mean validation accuracy of its seeds, chooses the highest, tests
that trial's runs alone (each as the same run launched alone), never the others', and whose
trials src.report tables."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from hydra_plugins.coop_optuna_sweeper.optuna_sweeper import search_space
from src.data.datamodule import FewShotDataModule
from src.report import write_report
from src.run.config import as_hydra_overrides
from src.run.search import SearchError
from src.run.training import train
from src.train import main
from tests.conftest import CONF_DIR, make_cfg


def test_the_search_space_in_hydras_sweep_syntax():
    space = search_space(
        [
            "ctx.n_ctx=choice(4, 8, 16)",  # as an hparams_search config gives them, then the command line's
            "method.module.lr=tag(log, interval(0.0002, 0.02))",
            "trainer.max_epochs=int(interval(10, 50))",
            "ctx.n_ctx=8",  # the command line fixes what the config searched
            'ctx.init="a photo of a",null',
            "seeds=1,2,3",  # never searched: the seeds of every trial
            "experiment=quickstart",
        ],
        OverridesParser.create(),
    )
    dims = {d.key: d.distribution for d in space.dimensions}
    assert list(dims) == ["method.module.lr", "trainer.max_epochs", "ctx.init"]
    lr, epochs, init = dims.values()
    assert (type(lr).__name__, lr.low, lr.high, lr.log) == ("FloatDistribution", 0.0002, 0.02, True)
    assert (type(epochs).__name__, epochs.low, epochs.high, epochs.log) == ("IntDistribution", 10, 50, False)
    assert init.choices == ("a photo of a", None)
    assert space.fixed == ("ctx.n_ctx=8", "experiment=quickstart")
    assert space.seeds == (1, 2, 3)
    params = {"method.module.lr": 0.001, "trainer.max_epochs": 20, "ctx.init": "a photo of a"}
    assert space.trial_overrides(params) == [
        "ctx.n_ctx=8",
        "experiment=quickstart",
        "++seeds=[1,2,3]",
        "method.module.lr=0.001",
        "trainer.max_epochs=20",
        'ctx.init="a photo of a"',
    ]
    assert search_space(["ctx.n_ctx=4,8", "seeds=[2,5]"], OverridesParser.create()).seeds == (2, 5)
    with pytest.raises(SearchError, match="seeds are integers"):
        search_space(["ctx.n_ctx=4,8", "seeds=a,b"], OverridesParser.create())
    with pytest.raises(SearchError, match="nothing to search"):
        search_space(["ctx.n_ctx=4"], OverridesParser.create())


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_a_search_chooses_by_validation_tests_only_the_chosen_and_is_reported(
    cli, cache_dir, tmp_path, recwarn, monkeypatch
):
    sweep = tmp_path / "search"
    test_reads = []  # the seed of every run that asks for the test split
    test_loader = FewShotDataModule.test_dataloader
    monkeypatch.setattr(
        FewShotDataModule, "test_dataloader", lambda self: test_reads.append(self.seed) or test_loader(self)
    )
    digits = [
        "experiment=quickstart",  # the tiny pre-trained CLIP on digits
        f"paths.cache_dir={cache_dir}",
        "shots=1",  # 10 train and 10 validation images
        "baseline=null",  # the quick start's zero-shot test: not what this tests
        "trainer.enable_progress_bar=false",
    ]
    args = [
        "-m",
        "hparams_search=coop_optuna",
        *digits,
        "trainer.max_epochs=choice(1,2)",
        "hydra.sweeper.n_trials=3",
        "seeds=1,2",
        f"hydra.sweep.dir={sweep}",
    ]
    cli(main, as_hydra_overrides(args))

    search = json.loads((sweep / "search.json").read_text())
    best = json.loads((sweep / "best.json").read_text())
    trials = search["trials"]
    assert [t["trial"] for t in trials] == [0, 1, 2] and {t["state"] for t in trials} == {"complete"}
    assert search["seeds"] == [1, 2]
    searched = OmegaConf.load(Path(CONF_DIR) / "hparams_search/coop_optuna.yaml").hydra.sweeper.params
    assert set(search["space"]) == set(searched)  # the config's keys (epochs: from the command line)
    for trial in trials:  # a trial's score: the mean of its runs' validation accuracies, as written
        files = {seed: sweep / trial["dir"] / f"seed{seed}/validation.json" for seed in (1, 2)}
        written = {seed: json.loads(file.read_text())["val_acc"] for seed, file in files.items()}
        assert trial["val_accs"] == {str(s): acc for s, acc in written.items()}
        assert trial["val_acc"] == pytest.approx(sum(written.values()) / 2)
    highest = max(t["val_acc"] for t in trials)
    chosen = next(t for t in trials if t["val_acc"] == highest)  # the earliest of equals
    assert best["trial"] == chosen["trial"] == search["chosen"]["trial"]
    assert best["val_acc"] == highest and best["params"] == chosen["params"]

    # The chosen trial's runs are tested; the others' never read the test split.
    tested = {}
    for trial in trials:
        for seed in (1, 2):
            run = sweep / trial["dir"] / f"seed{seed}"
            rows = read_csv(run / "csv/metrics.csv")
            assert any(row.get("val/acc") for row in rows)  # validated after the last epoch, kept
            if trial["trial"] == best["trial"]:
                results = json.loads((run / "results.json").read_text())
                tested[str(seed)] = results["test_acc"]
                assert results["epochs"] == best["params"]["trainer.max_epochs"]
                assert any(row.get("test/acc") for row in rows)
            else:
                assert not (run / "results.json").exists() and not (run / "prompt.pt").exists()
                assert not any(row.get("test/acc") for row in rows)
    assert best["test_accs"] == tested
    assert test_reads == [1, 2]  # by the chosen trial's two runs alone
    assert best["test_acc"] == pytest.approx(sum(tested.values()) / 2)
    assert best["runs"] == [f"{chosen['dir']}/seed1", f"{chosen['dir']}/seed2"]
    assert not [w for w in recwarn if "callbacks used to create the checkpoint" in str(w.message)]

    # A chosen run ends as the run of its setting launched alone: the same context, the same test.
    setting = [f"{k}={v}" for k, v in best["params"].items()]
    alone = train(make_cfg([*digits, *setting, "seed=1"], tmp_path / "alone"))
    chosen_run = sweep / chosen["dir"] / "seed1"
    assert alone["test_acc"] == tested["1"]
    ctx = [torch.load(p / "prompt.pt", weights_only=True)["ctx"] for p in (tmp_path / "alone", chosen_run)]
    assert torch.equal(*ctx)

    best_yaml = (sweep / "best.yaml").read_text()
    assert f"trial: {best['trial']}" in best_yaml
    assert "command: python -m src.train -m experiment=quickstart" in best_yaml and "seed=1,2" in best_yaml

    report = write_report(sweep).read_text()
    assert "## Hyper-parameter searches" in report
    assert "3 trials, chosen by validation accuracy (%, mean over seeds 1, 2)" in report
    lines = report.splitlines()
    header = cells(next(line for line in lines if line.startswith("| trial ")))
    for trial in trials:
        line = next(line for line in lines if line.startswith(f"| {trial['trial']} "))
        row = dict(zip(header, cells(line), strict=True))
        assert row["ctx.n_ctx"] == str(trial["params"]["ctx.n_ctx"])
        assert row["val acc"] == f"{trial['val_acc']:.2f}"
        assert row["val seed 2"] == f"{trial['val_accs']['2']:.2f}"
        tested_here = ["yes", f"{best['test_acc']:.2f}"] if trial["trial"] == best["trial"] else ["", ""]
        assert [row["chosen"], row["test acc"]] == tested_here


def cells(line: str) -> list[str]:
    """The cells of a row of a markdown table."""
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_a_trials_seeds_train_as_one_pack_and_score_as_alone(cli, cache_dir, tmp_path):
    """pack=true: each trial's two seeds train as one pack on one frozen CLIP; each run validates as
    the same run alone (its validation.json, the trial's score), and the chosen trial is tested."""
    sweep = tmp_path / "search"
    digits = [
        "experiment=quickstart",
        f"paths.cache_dir={cache_dir}",
        "shots=1",
        "baseline=null",
        "trainer.enable_progress_bar=false",
    ]
    args = ["-m", "hparams_search=coop_optuna", *digits, "trainer.max_epochs=choice(1,2)", "pack=true"]
    cli(
        main, as_hydra_overrides([*args, "hydra.sweeper.n_trials=2", "seeds=1,2", f"hydra.sweep.dir={sweep}"])
    )
    search = json.loads((sweep / "search.json").read_text())
    best = json.loads((sweep / "best.json").read_text())
    for trial in search["trials"]:
        runs = {
            seed: json.loads((sweep / trial["dir"] / f"seed{seed}/validation.json").read_text())
            for seed in (1, 2)
        }
        assert [run["pack_size"] for run in runs.values()] == [2, 2]
        assert trial["val_accs"] == {str(seed): run["val_acc"] for seed, run in runs.items()}
    trial = search["trials"][0]
    setting = [f"{key}={value}" for key, value in trial["params"].items()]
    alone = train(make_cfg([*digits, *setting, "seed=2"], tmp_path / "alone"), test=False)
    assert alone["val_acc"] == pytest.approx(trial["val_accs"]["2"], abs=1e-6)
    assert set(best["test_accs"]) == {"1", "2"}

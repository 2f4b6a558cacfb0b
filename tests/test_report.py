"""Reports: tables and plots from a folder of results.json files (synthetic runs, known values)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import wandb
import yaml
from matplotlib.image import imread

from src.report import (
    SOURCE_KEY,
    ReportError,
    average_over_datasets,
    base_to_new_table,
    cells,
    fewshot_table,
    harmonic_mean,
    load_runs,
    main,
    plot_fewshot,
    transfer_table,
    write_report,
)
from tests.wandb_records import finished_records

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "RN50-quickgelu"
COOP = "coop unified end M16"


def write_run(root: Path, rel: str, acc: float, mtime: float | None = None, **fields) -> Path:
    data = {
        "dataset": "oxford_pets",
        "method": "coop",
        "shots": 16,
        "seed": 1,
        "ctx": "unified",
        "n_ctx": 16,
        "ctx_init": None,
        "class_token_position": "end",
        "backbone": BACKBONE,
        "test_acc": acc,
        **fields,
    }
    if data["method"] != "coop":
        data.update(ctx=None, n_ctx=None, class_token_position=None)
    path = root / rel / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def acc_of(dataset: str, method: str, shots: int, seed: int) -> float:
    base = {"oxford_pets": 80.0, "dtd": 50.0}[dataset] + {"coop": 5.0, "linear_probe": 0.0}[method]
    return base + shots + seed  # seeds 1, 2, 3: mean base + shots + 2, std sqrt(2/3)


@pytest.fixture
def grid(tmp_path: Path) -> Path:
    """2 datasets x shots 1, 2 x seeds 1-3 of CoOp and the linear probe, zero-shot once each;
    dtd's CoOp 2-shot lacks seed 3; one oxford_pets run is there twice."""
    for dataset in ("oxford_pets", "dtd"):
        write_run(tmp_path, f"{dataset}/zeroshot", {"oxford_pets": 70.0, "dtd": 40.0}[dataset],
                  dataset=dataset, method="zeroshot", shots=1, seed=1)  # fmt: skip
        for method in ("coop", "linear_probe"):
            for shots in (1, 2):
                for seed in (1, 2, 3):
                    if (dataset, method, shots, seed) == ("dtd", "coop", 2, 3):
                        continue
                    acc = acc_of(dataset, method, shots, seed)
                    write_run(tmp_path, f"{dataset}/{method}/{shots}/{seed}", acc, 1000.0,
                              dataset=dataset, method=method, shots=shots, seed=seed)  # fmt: skip
    # the same run in an older sweep folder, with another result: the newer one counts
    write_run(tmp_path, "old_sweep/oxford_pets/coop/1/1", 0.0, 10.0, shots=1, seed=1)
    return tmp_path


def test_fewshot_cells_are_means_over_seeds(grid):
    table = cells(load_runs(grid)).set_index(["dataset", "variant", "shots"])
    pets = table.loc[("oxford_pets", COOP, 1)]
    assert pets["mean"] == pytest.approx(85 + 1 + 2) and pets["std"] == pytest.approx(np.sqrt(2 / 3))
    assert pets["n"] == 3 and pets["duplicated"] and pets["missing_seeds"] == ()
    dtd = table.loc[("dtd", COOP, 2)]
    assert dtd["mean"] == pytest.approx(55 + 2 + 1.5) and dtd["missing_seeds"] == (3,)
    zeroshot = table.loc[("dtd", "zeroshot", 0)]
    assert zeroshot["mean"] == 40.0 and zeroshot["missing_seeds"] == () and zeroshot["n"] == 1


def test_tables_mark_incomplete_and_duplicated_settings(grid):
    table = cells(load_runs(grid))
    fewshot = fewshot_table(table, BACKBONE)
    assert fewshot.loc[("oxford_pets", COOP), "1-shot"] == "88.00 ± 0.82†"  # the duplicate marked
    assert fewshot.loc[("dtd", COOP), "2-shot"] == "58.50 ± 0.50*"  # seeds 1 and 2 only
    assert fewshot.loc[("dtd", "zeroshot"), "zero-shot"] == "40.00"
    # the mean over datasets of the per-dataset means
    average = average_over_datasets(table, BACKBONE)
    assert average.loc[COOP, "1-shot"] == "73.00†" and average.loc[COOP, "2-shot"] == "73.75*"
    assert (
        average.loc["linear_probe", "2-shot"] == "69.00" and average.loc["zeroshot", "zero-shot"] == "55.00"
    )


def test_report_writes_runs_tables_and_problem_lists(grid):
    report = write_report(grid).read_text()
    runs = pd.read_csv(grid / "report" / "runs.csv")
    assert len(runs) == 2 * (1 + 2 * 2 * 3) - 1 + 1 and runs["duplicate_of_newer"].sum() == 1
    assert "| oxford_pets | coop unified end M16 |             | 88.00 ± 0.82† |" in report
    assert "### Average over datasets" in report and "![average](plots/" in report
    problems = report.split("## Incomplete and duplicated runs")[1]
    missing = next(line for line in problems.splitlines() if "| dtd " in line)
    assert "| 2 " in missing and "| 1, 2 " in missing and "| 3 " in missing
    assert "| 0.00 " in problems and "| False  | old_sweep/oxford_pets/coop/1/1 |" in problems
    assert "Settings not run at all" not in problems


def test_fewshot_plots_show_every_method(grid):
    write_report(grid)
    plots = sorted((grid / "report" / "plots").glob("*.png"))
    assert [p.name for p in plots] == [
        f"fewshot_{BACKBONE}_average.png",
        f"fewshot_{BACKBONE}_dtd.png",
        f"fewshot_{BACKBONE}_oxford_pets.png",
    ]
    for plot in plots:
        pixels = imread(plot)
        assert pixels.shape[0] > 200 and pixels[..., :3].std() > 0.05  # drawn on, not blank
    fig = plot_fewshot(cells(load_runs(grid)), BACKBONE, "dtd")
    (ax,) = fig.axes
    assert sorted(ax.get_legend_handles_labels()[1]) == [COOP, "linear_probe", "zeroshot"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2"]
    zeroshot_line = next(line for line in ax.get_lines() if line.get_label() == "zeroshot")
    assert list(zeroshot_line.get_ydata()) == [40.0, 40.0]


def test_base_to_new_and_transfer_tables(tmp_path):
    for dataset, (base, new) in {"oxford_pets": (90.0, 60.0), "dtd": (70.0, 50.0)}.items():
        for seed in (1, 2, 3):
            base_acc = base + seed - 2
            write_run(
                tmp_path, f"b2n/{dataset}_b/{seed}", base_acc, dataset=dataset, subsample="base", seed=seed
            )
            write_run(tmp_path, f"b2n/{dataset}_new/{seed}", new, dataset=dataset, subsample="new", seed=seed)
    for seed in (1, 2, 3):
        write_run(tmp_path, f"in/{seed}", 63.0, dataset="imagenet", seed=seed)
        for target, acc in {"imagenetv2": 55.0, "imagenet_a": 30.0, "dtd": 40.0}.items():
            write_run(
                tmp_path, f"out/{target}/{seed}", acc, dataset=target, seed=seed, **{SOURCE_KEY: "imagenet"}
            )
    # zero-shot CLIP on ImageNet and, with no `trained_on`, on a target: the table's CLIP row
    write_run(tmp_path, "zs/imagenet", 58.0, dataset="imagenet", method="zeroshot")
    write_run(tmp_path, "zs/imagenetv2", 51.0, dataset="imagenetv2", method="zeroshot")
    table = cells(load_runs(tmp_path))
    b2n = base_to_new_table(table, BACKBONE)
    assert b2n.loc[(COOP, 16, "oxford_pets"), "H"] == f"{harmonic_mean(90, 60):.2f}"
    assert b2n.loc[(COOP, 16, "average")].tolist() == ["80.00", "55.00", f"{harmonic_mean(80, 55):.2f}"]
    dg = transfer_table(table, BACKBONE, ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"])
    assert dg.loc[("imagenet", COOP, 16)].to_dict() == {
        "imagenet (source)": "63.00 ± 0.00",
        "imagenetv2": "55.00 ± 0.00",
        "imagenet_a": "30.00 ± 0.00",
        "average": "42.50*",  # imagenet_sketch and imagenet_r were not run
    }
    assert dg.loc[("imagenet", "zeroshot", 0)].to_dict() == {
        "imagenet (source)": "58.00",
        "imagenetv2": "51.00",
        "imagenet_a": "",
        "average": "51.00*",
    }
    cross = transfer_table(table, BACKBONE, ["dtd"])
    assert cross.loc[("imagenet", COOP, 16)].tolist() == ["63.00 ± 0.00", "40.00 ± 0.00", "40.00"]
    report = write_report(tmp_path).read_text()
    assert "### Domain generalisation" in report and "### Cross-dataset transfer" in report
    assert "### Base-to-new" in report


def test_harmonic_mean_of_the_papers_average():
    # CoCoOp paper, CoOp over 11 datasets: base 82.69, new 63.22, H 71.66
    assert harmonic_mean(82.69, 63.22) == pytest.approx(71.66, abs=0.005)


def test_empty_folder_or_foreign_results_are_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no results.json"):
        load_runs(tmp_path / "empty")
    with pytest.raises(ReportError, match="no such folder"):
        load_runs(tmp_path / "absent")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.json").write_text('{"accuracy": 3}')
    with pytest.raises(ReportError, match=r"other/results.json lacks \['dataset', 'method'"):
        load_runs(tmp_path / "other")
    run = subprocess.run(
        [sys.executable, "-m", "src.report", str(tmp_path / "empty")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and "no results.json" in run.stderr


def test_an_unreadable_results_file_is_listed_and_the_others_are_tabled(grid):
    """One results.json cut short (a job killed while copying): every other run is tabled, the file
    is listed in report.md and on stderr, and the exit status says the report left some out."""
    broken = grid / "broken" / "results.json"
    broken.parent.mkdir()
    broken.write_text('{"dataset": "dtd", "method": "co')
    run = subprocess.run(
        [sys.executable, "-m", "src.report", str(grid)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 1
    (warning,) = [line for line in run.stderr.splitlines() if line.startswith("warning:")]
    assert f"{broken}: not a readable results file" in warning
    report = (grid / "report" / "report.md").read_text()
    assert "## Unreadable runs" in report and str(broken) in report
    runs = pd.read_csv(grid / "report" / "runs.csv")
    assert "broken" not in set(runs["path"])
    broken.unlink()
    assert report.split("## Unreadable runs")[0] == write_report(grid, grid / "clean").read_text()
    assert len(runs) == len(load_runs(grid))


def test_a_runs_own_evaluation_is_no_second_run_and_its_baseline_is_tabled(tmp_path):
    """The README's steps (train, src.eval on the same dataset, src.report): the evaluation repeats
    the run's test and is not a second run (no `†`); a run's zero-shot baseline (`zeroshot_acc`) is
    zero-shot CLIP's row, once per test set, and none where zero-shot CLIP ran itself."""
    for seed in (1, 2):
        run = f"pets/coop/{seed}"
        write_run(tmp_path, run, 90.0 + seed, shots=4, seed=seed, zeroshot_acc=70.0)
        write_run(tmp_path, f"{run}/eval/oxford_pets", 90.0 + seed, shots=4, seed=seed,
                  ckpt=f"{run}/prompt.pt", trained_on="oxford_pets", trained_subsample="all")  # fmt: skip
    write_run(tmp_path, "dtd/coop/1", 60.0, dataset="dtd", shots=4, zeroshot_acc=40.0)
    write_run(tmp_path, "dtd/zeroshot", 41.0, dataset="dtd", method="zeroshot", shots=1)
    runs = load_runs(tmp_path)
    assert set(runs.loc[runs["ckpt"].notna(), "protocol"]) == {"evaluation"}
    assert not runs["duplicate_of_newer"].any()
    fewshot = fewshot_table(cells(runs), BACKBONE)
    assert fewshot.loc[("oxford_pets", COOP), "4-shot"] == "91.50 ± 0.50"
    assert fewshot.loc[("oxford_pets", "zeroshot"), "zero-shot"] == "70.00"  # the runs' baseline, once
    assert fewshot.loc[("dtd", "zeroshot"), "zero-shot"] == "41.00"  # its own run, not the baseline
    assert "†" not in write_report(tmp_path).read_text()


def logged_to_wandb(grid: Path, tmp_path: Path, monkeypatch) -> Path:
    """Two runs of `grid` as logger=wandb leaves them, one recording its id (`wandb_run_id`), one only
    its wandb/ folder; the offline W&B settings of a test. Returns WANDB_DIR."""
    pets, dtd = grid / "oxford_pets/coop/1/1", grid / "dtd/coop/2/1"
    (pets / "wandb_run_id").write_text("abc123\n")
    (dtd / "wandb/offline-run-20250101_120000-def456").mkdir(parents=True)
    for folder, entity in ((pets, "myteam"), (dtd, None)):
        logger = {"logger": {"wandb": {"project": "coop-sweep", "entity": entity, "job_type": "train"}}}
        (folder / "config.yaml").write_text(yaml.safe_dump(logger))
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb.teardown()  # wandb reads the environment once a process: read these
    return tmp_path / "wandb_dir"


def test_report_logs_one_wandb_run_of_its_tables_figures_and_runs(grid, tmp_path_factory, monkeypatch):
    """`--wandb`, offline: one W&B run of job_type `report` in the project the runs logged to, with
    every table of report.md as the numbers of its cells, the figures, and the runs (runs.csv) with
    the W&B run each logged to; nothing else."""
    wandb_dir = logged_to_wandb(grid, tmp_path_factory.mktemp("wandb"), monkeypatch)
    main([str(grid), "--wandb"])

    (run_dir,) = (wandb_dir / "wandb").glob("offline-run-*")
    records = finished_records(next(run_dir.glob("run-*.wandb")))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.job_type, run.project, run.display_name) == ("report", "coop-sweep", f"report-{grid.name}")
    files = run_dir / "files"
    tables = {
        str(path.relative_to(files / "media/table")).rsplit("_0_", 1)[0]: json.loads(path.read_text())
        for path in files.glob("media/table/**/*.table.json")
    }
    report = (grid / "report" / "report.md").read_text()
    assert report.count("\n### ") == 2  # the few-shot table and its average: both logged
    assert set(tables) == {
        f"{BACKBONE}/fewshot",
        f"{BACKBONE}/average",
        "problems/incomplete_settings",
        "problems/duplicated_runs",
        "runs",
    }
    frames = {key: pd.DataFrame(t["data"], columns=t["columns"]) for key, t in tables.items()}
    fewshot = frames[f"{BACKBONE}/fewshot"].set_index(["dataset", "variant", "shots"])
    assert len(fewshot) == 2 * (2 * 2 + 1)  # dataset x (2 methods x 2 shots, zero-shot)
    pets = fewshot.loc[("oxford_pets", COOP, 1)]
    assert pets["mean"] == pytest.approx(88.0) and pets["std"] == pytest.approx(np.sqrt(2 / 3))
    assert (pets["n_seeds"], pets["duplicated"], pets["cell"]) == (3, True, "88.00 ± 0.82†")
    dtd = fewshot.loc[("dtd", COOP, 2)]
    assert (dtd["mean"], dtd["n_seeds"], dtd["missing_seeds"], dtd["incomplete"]) == (58.5, 2, "3", True)
    assert dtd["cell"] == "58.50 ± 0.50*"
    average = frames[f"{BACKBONE}/average"].set_index(["variant", "shots"])
    assert average.loc[(COOP, 2)].to_dict() == {
        "mean": 73.75, "datasets": 2, "incomplete": True, "duplicated": False, "cell": "73.75*"
    }  # fmt: skip
    duplicated = frames["problems/duplicated_runs"]
    assert sorted(duplicated["test_acc"]) == [0.0, 87.0] and sorted(duplicated["used"]) == [False, True]

    runs = frames["runs"].set_index("path")
    csv = pd.read_csv(grid / "report" / "runs.csv").set_index("path")
    assert list(runs.columns) == [*csv.columns, "wandb_url"] and (runs["test_acc"] == csv["test_acc"]).all()
    assert runs.loc["oxford_pets/coop/1/1", "wandb_run"] == "myteam/coop-sweep/abc123"
    assert runs.loc["dtd/coop/2/1", "wandb_run"] == "coop-sweep/def456"  # entity: the account's
    assert runs["wandb_run"].notna().sum() == 2 and runs["wandb_url"].isna().all()  # offline: no URL

    images = sorted(files.glob("media/images/**/*.png"))
    plots = sorted((grid / "report" / "plots").glob("*.png"))
    assert [p.name.split("_0_")[0] for p in images] == ["plot_average", "plot_dtd", "plot_oxford_pets"]
    for image, plot in zip(images, plots, strict=True):
        assert np.array_equal(imread(image), imread(plot))
    # the report's own tables and figures only: no weights, no dataset images, no code
    assert {p.relative_to(files) for p in files.rglob("*") if p.is_file()} == {
        Path("requirements.txt"),
        *(p.relative_to(files) for p in files.glob("media/table/**/*.table.json")),
        *(p.relative_to(files) for p in images),
    }


def test_a_searchs_trials_are_a_wandb_table_of_the_report(grid, tmp_path_factory, monkeypatch):
    """A hyper-parameter search under the folder (its search.json): its trials table of report.md is
    also a table of the W&B report, with the searched values unrounded."""
    lrs = [0.0013785388962275391, 0.002621]
    trials = [
        {"trial": i, "state": "complete", "params": {"ctx.n_ctx": n, "method.optimizer.lr": lr},
         "val_acc": acc, "val_accs": {"1": acc - 1, "2": acc + 1}, "dir": f"trial{i}"}
        for i, (n, lr, acc) in enumerate(zip((16, 8), lrs, (83.75, 81.25), strict=True))
    ]  # fmt: skip
    chosen = {"trial": 0, "test_acc": 83.24}
    search = {"seeds": [1, 2], "trials": trials, "chosen": chosen}
    (grid / "search_dtd").mkdir()
    (grid / "search_dtd" / "search.json").write_text(json.dumps(search))
    wandb_dir = logged_to_wandb(grid, tmp_path_factory.mktemp("wandb"), monkeypatch)
    main([str(grid), "--wandb"])

    report = (grid / "report" / "report.md").read_text()
    assert "### search_dtd" in report and "| 0       | 16          | 0.001379" in report
    (run_dir,) = (wandb_dir / "wandb").glob("offline-run-*")
    (file,) = (run_dir / "files" / "media" / "table" / "searches").glob("search_dtd_0_*.table.json")
    logged = json.loads(file.read_text())
    frame = pd.DataFrame(logged["data"], columns=logged["columns"]).set_index("trial")
    assert list(frame["method.optimizer.lr"]) == lrs and list(frame["ctx.n_ctx"]) == [16, 8]
    assert list(frame["val acc"]) == [83.75, 81.25] and list(frame["val seed 2"]) == [84.75, 82.25]
    assert list(frame["chosen"]) == ["yes", ""] and frame.loc[0, "test acc"] == 83.24
    assert logged["data"][1][logged["columns"].index("test acc")] is None  # only the chosen is tested


def test_wandb_mistakes_are_one_error_line(grid, tmp_path_factory, monkeypatch, capsys):
    """A project name W&B refuses stops the report before it is written; runs that logged to
    several projects need the report's named; no wandb package says how to install it."""

    def error(*args: str) -> str:
        with pytest.raises(SystemExit) as stop:
            main([str(grid), "--wandb", *args])
        (line,) = capsys.readouterr().err.splitlines()
        assert stop.value.code == 2 and line.startswith("error: ")
        return line

    refused = error("--wandb-project", "coop/sweep")
    assert refused.startswith("error: --wandb-project") and "Invalid project name 'coop/sweep'" in refused
    assert not (grid / "report").exists()
    logged_to_wandb(grid, tmp_path_factory.mktemp("wandb"), monkeypatch)
    other = grid / "dtd/coop/2/1/config.yaml"
    other.write_text(other.read_text().replace("coop-sweep", "other"))
    assert "several W&B projects (coop-sweep, other); give the report's with --wandb-project" in error()
    monkeypatch.setitem(sys.modules, "wandb", None)
    line = error()
    assert line.startswith("error: --wandb needs the wandb package") and line.endswith("pip install wandb")

"""The paper's tables and figures from a folder of runs.

    python -m src.report outputs/fewshot_grid            # or: make report DIR=outputs/fewshot_grid
    python -m src.report outputs/fewshot_grid --wandb    # also as one W&B run (WANDB_MODE=offline works)

Reads every results.json under DIR and writes, into DIR/report/ (or --out):
  runs.csv      one row per run (duplicates marked),
  report.md     few-shot accuracy per dataset x method x shots (mean ± std over seeds), its
                average over datasets, the domain generalisation, cross-dataset and base-to-new
                tables, and the runs that are missing seeds or duplicated,
  plots/*.png   few-shot curves per dataset and their average: the CoOp variants against the
                zero-shot and linear-probe baselines.

A hyper-parameter search under DIR (its search.json, `python -m src.train -m hparams_search=...`)
is tabled too: a row per trial, its settings and validation accuracy (mean over its seeds, and
each seed's), the chosen trial marked with its test accuracy; the chosen trial's runs are runs of
the tables above, the others were never tested.

Runs are never silently merged: a setting that lacks seeds other settings have is marked `*`
in the tables and listed; two results for the same run (e.g. from two sweep folders) are
listed, and only the newest is used (marked `†`).

--wandb also logs the report as one W&B run of job_type `report` (src/run/wandb_runs.py), in the
project the runs logged to (logger=wandb) unless --wandb-project names another: each table of
report.md as a wandb.Table of the numbers its cells are formatted from (mean, std, number of seeds,
missing seeds, the printed cell; a search's trials with their searched values unrounded), the
plots as images, and runs.csv with each run's W&B run (`wandb_run`, also a column of runs.csv) and
its page (`wandb_url`, where the entity is known).

A results.json that cannot be read (cut short, not this project's) does not stop the report: the
tables are written from every readable run, and the unreadable ones are listed in report.md and
as `warning:` lines. Exit status: 0 when every run was read, 1 when the report left some out, 2
when there is nothing to report (no folder, no readable run) or --wandb could not log it (one
`error:` line; the files are written unless the project name was refused).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display (clusters, CI)

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from src.common.files import atomic_write  # noqa: E402
from src.data.benchmark import DOMAIN_GENERALIZATION  # noqa: E402
from src.run.wandb_runs import (  # noqa: E402
    WandbReportError,
    import_wandb,
    log_report,
    report_project,
    wandb_run_path,
)

log = logging.getLogger(__name__)

# What the method contract says of each run's method (src/methods/base.py), in results.json:
# `zero_shot` methods depend neither on the shots nor on the seed (plotted as a line, tabled at
# 0 shots, one run expected per dataset); `learns_context` methods have variants (class-specific,
# position, M) told apart. Results written before these fields were: by the project's own methods.
CONTRACT_FIELDS = ("zero_shot", "learns_context")
LEGACY_ZERO_SHOT = ("zeroshot", "zeroshot_ensemble", "tpt")
LEGACY_CONTEXT = ("coop", "cocoop", "kgcoop", "prograd", "maple")
# The key of results.json naming the dataset a transferred prompt was trained on.
SOURCE_KEY = "trained_on"
REQUIRED = ("dataset", "method", "backbone", "shots", "seed", "test_acc")
CELL = ["protocol", "backbone", "source", "dataset", "subsample", "variant", "shots"]
INCOMPLETE, DUPLICATED = "*", "†"


SEARCH_FILE = "search.json"  # a hyper-parameter search's trials (hydra_plugins/coop_optuna_sweeper)


class ReportError(ValueError):
    """There is nothing to report, or a results file cannot be read."""


def load_runs(root: Path) -> pd.DataFrame:
    """One row per readable results.json under `root`, with its folder (`path`) and modification
    time; the unreadable ones are logged (`read_runs` returns them)."""
    runs, unreadable = read_runs(root)
    for problem in unreadable:
        log.warning("%s", problem)
    return runs


def read_runs(root: Path) -> tuple[pd.DataFrame, list[str]]:
    """The readable runs under `root` (as `load_runs`) and a line for each results.json that is not
    one; ReportError when no run is readable."""
    if not root.is_dir():
        raise ReportError(f"{root}: no such folder; give the folder of a run or of a sweep")
    rows, unreadable = [], []
    for file in sorted(root.rglob("results.json")):
        try:
            data = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            unreadable.append(f"{file}: not a readable results file ({err}); delete or rerun it")
            continue
        missing = [key for key in REQUIRED if key not in data] if isinstance(data, dict) else list(REQUIRED)
        if missing:
            unreadable.append(f"{file} lacks {missing}: not a results file of this project; move it away")
            continue
        folder = file.parent
        place = {"path": str(folder.relative_to(root)), "mtime": file.stat().st_mtime}
        rows.append({**data, **place, "wandb_run": wandb_run_path(folder)})
    if not rows:
        raise ReportError(
            "; ".join(unreadable)
            or f"{root}: no results.json under it; give the folder of a run or of a sweep"
        )
    return tidy(pd.DataFrame(rows)), unreadable


def variant_name(row: pd.Series) -> str:
    """`coop unified end M16` for a learned context, the method's name otherwise; then what sets
    a run apart from the method's plain runs: `noise=0.25` (noisy labels), `(features)` (how an
    ensemble averages)."""
    name = str(row["method"])
    if row["learns_context"] and not pd.isna(row.get("ctx")):
        name = f"{name} {row['ctx']} {row['class_token_position']} M{int(row['n_ctx'])}"
        init = row.get("ctx_init")
        name = f"{name} init={init!r}" if isinstance(init, str) else name
    if isinstance(row.get("ensemble"), str):
        name = f"{name} ({row['ensemble']})"
    return f"{name} noise={row['label_noise']:g}" if row["label_noise"] > 0 else name


def tidy(runs: pd.DataFrame) -> pd.DataFrame:
    """Adds the columns that place each run in a table, and marks duplicated runs."""
    runs = runs.copy()
    defaults = {"subsample": "all", SOURCE_KEY: None, "ctx_init": None, "label_noise": 0.0, "ensemble": None}
    defaults |= {"zeroshot_acc": None, "ckpt": None, "trained_subsample": None}
    for column, default in defaults.items():
        if column not in runs:
            runs[column] = default
    runs = with_baselines(runs)
    for column, legacy in zip(CONTRACT_FIELDS, (LEGACY_ZERO_SHOT, LEGACY_CONTEXT), strict=True):
        known = runs[column] if column in runs else pd.Series(None, index=runs.index, dtype=object)
        runs[column] = known.where(known.notna(), runs["method"].isin(legacy)).astype(bool)
    runs["subsample"] = runs["subsample"].fillna("all")
    runs["label_noise"] = runs["label_noise"].fillna(0.0)
    runs["source"] = runs[SOURCE_KEY].fillna(runs["dataset"])
    # The domain generalisation targets are test sets: a training-free method run on one is that
    # study's evaluation, with ImageNet as the source.
    runs.loc[runs["zero_shot"] & runs["dataset"].isin(DOMAIN_GENERALIZATION), "source"] = "imagenet"
    runs["variant"] = runs.apply(variant_name, axis=1)
    # no seeds to expect: training-free runs, and ensembles of prompts of several seeds (seed 0)
    runs["seedless"] = runs["zero_shot"] | (runs["ensemble"].notna() & (runs["seed"] == 0))
    # Zero-shot runs at any shots and seed are one and the same run.
    runs.loc[runs["zero_shot"], ["shots", "seed"]] = 0
    runs["protocol"] = "fewshot"
    runs.loc[runs["source"] != runs["dataset"], "protocol"] = "transfer"
    runs.loc[runs["subsample"] != "all", "protocol"] = "base_to_new"
    # src.eval of one prompt on the classes it was trained on repeats its run's test: not a run of
    # its own (kept in runs.csv, out of the tables). On other classes or data it is the protocol's.
    own_test = runs["ckpt"].notna() & runs["ensemble"].isna() & (runs["source"] == runs["dataset"])
    own_test &= runs["subsample"] == runs["trained_subsample"].fillna("all")
    runs.loc[own_test, "protocol"] = "evaluation"
    # A run's baseline (zeroshot_acc) is zero-shot CLIP's run on its test set: one row per test set,
    # and none where that run itself is there.
    runs = runs.sort_values(["baseline", "mtime"], kind="stable")  # the runs first, then baselines
    runs = runs[~(runs["baseline"] & runs.duplicated([*CELL, "seed"], keep="first"))]
    runs = runs.sort_values("mtime", kind="stable")
    runs["duplicate_of_newer"] = runs.duplicated([*CELL, "seed"], keep="last")
    return runs.sort_values([*CELL, "seed"], kind="stable").reset_index(drop=True)


def with_baselines(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs, plus a zero-shot row for each run that measured its baseline (`baseline=zeroshot`:
    zero-shot CLIP with the dataset's hand-made template on the same test set)."""
    runs = runs.assign(baseline=False)
    measured = runs[runs["zeroshot_acc"].notna() & ~runs["method"].eq("zeroshot")]
    if measured.empty:
        return runs
    zero = measured.assign(
        method="zeroshot",
        test_acc=measured["zeroshot_acc"],
        test_macro_acc=float("nan"),
        zero_shot=True,
        learns_context=False,
        ensemble=None,
        label_noise=0.0,
        ckpt=None,
        baseline=True,
        path=measured["path"] + " (baseline)",
    )
    return pd.concat([runs, zero], ignore_index=True)


def cells(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and std (over seeds, ddof 0 as the reference's parse script) of each setting."""
    runs = runs[runs["protocol"] != "evaluation"]  # a run's own test repeated: in runs.csv only
    used = runs[~runs["duplicate_of_newer"]]
    duplicated = runs[runs["duplicate_of_newer"]].groupby(CELL, dropna=False).size()
    table = (
        used.groupby(CELL, dropna=False)
        .agg(
            mean=("test_acc", "mean"),
            std=("test_acc", lambda a: a.std(ddof=0)),
            n=("test_acc", "size"),
            seeds=("seed", lambda s: tuple(sorted(s))),
            zero_shot=("zero_shot", "first"),
            seedless=("seedless", "first"),
        )
        .reset_index()
    )
    expected = sorted(set(used.loc[~used["zero_shot"], "seed"]))
    table["missing_seeds"] = [
        () if free else tuple(s for s in expected if s not in seeds)
        for free, seeds in zip(table["seedless"], table["seeds"], strict=True)
    ]
    table["duplicated"] = [tuple(key) in duplicated.index for key in table[CELL].itertuples(index=False)]
    return table


def fmt(mean: float, std: float = math.nan, n: int = 1, incomplete: bool = False, dup: bool = False) -> str:
    text = f"{mean:.2f}" if n < 2 or math.isnan(std) else f"{mean:.2f} ± {std:.2f}"
    return text + (INCOMPLETE if incomplete else "") + (DUPLICATED if dup else "")


def cell_text(row: pd.Series) -> str:
    return fmt(row["mean"], row["std"], row["n"], bool(row["missing_seeds"]), row["duplicated"])


def cell_numbers(row: pd.Series) -> dict:
    """A setting of `cells` as a table's cell: its mean, std and number of seeds, the seeds that are
    missing (`incomplete`), whether a run of it was there twice, and `cell`, the text report.md
    prints."""
    return {
        "mean": row["mean"],
        "std": row["std"],
        "n_seeds": row["n"],
        "missing_seeds": row["missing_seeds"],
        "incomplete": bool(row["missing_seeds"]),
        "duplicated": row["duplicated"],
        "cell": cell_text(row),
    }


CELL_NUMBERS = ["mean", "std", "n_seeds", "missing_seeds", "incomplete", "duplicated", "cell"]


def fewshot_cells(table: pd.DataFrame, backbone: str) -> pd.DataFrame:
    """The few-shot table's cells, one row per dataset x method x shots (0: training-free methods)."""
    part = table[(table["protocol"] == "fewshot") & (table["backbone"] == backbone)]
    place = ["dataset", "variant", "shots"]
    rows = [{**row[place].to_dict(), **cell_numbers(row)} for _, row in part.iterrows()]
    return pd.DataFrame(rows, columns=[*place, *CELL_NUMBERS])


def fewshot_table(table: pd.DataFrame, backbone: str) -> pd.DataFrame:
    """Rows dataset x method, columns shots (0: training-free methods)."""
    return fewshot_wide(fewshot_cells(table, backbone))


def fewshot_wide(numbers: pd.DataFrame) -> pd.DataFrame:
    wide = numbers.pivot_table(index=["dataset", "variant"], columns="shots", values="cell", aggfunc="first")
    return wide.rename(columns=shots_label).rename_axis(columns=None)


def average_cells(table: pd.DataFrame, backbone: str) -> pd.DataFrame:
    """One row per method x shots: the mean over datasets of the per-dataset means, how many
    datasets have the setting, and whether some dataset lacks it or some seeds."""
    part = table[(table["protocol"] == "fewshot") & (table["backbone"] == backbone)]
    datasets = part["dataset"].nunique()
    rows = []
    for (variant, shots), group in part.groupby(["variant", "shots"]):
        incomplete = len(group) < datasets or any(map(bool, group["missing_seeds"]))
        mean, dup = group["mean"].mean(), bool(group["duplicated"].any())
        cell = fmt(mean, incomplete=incomplete, dup=dup)
        rows.append((variant, shots, mean, len(group), incomplete, dup, cell))
    columns = ["variant", "shots", "mean", "datasets", "incomplete", "duplicated", "cell"]
    return pd.DataFrame(rows, columns=columns)


def average_over_datasets(table: pd.DataFrame, backbone: str) -> pd.DataFrame:
    """Rows method, columns shots: the mean over datasets of the per-dataset means, marked when
    some dataset lacks the setting or some seeds."""
    return average_wide(average_cells(table, backbone))


def average_wide(numbers: pd.DataFrame) -> pd.DataFrame:
    wide = numbers.pivot(index="variant", columns="shots", values="cell").sort_index(axis=1)
    return wide.rename(columns=shots_label).rename_axis(columns=None)


def transfer_cells(table: pd.DataFrame, backbone: str, targets: list[str]) -> pd.DataFrame:
    """One row per source x method x shots x test set: the source's own test set (`<source>
    (source)`), each target that was run, and the average over the targets (marked when some were
    not run)."""
    part = table[(table["backbone"] == backbone) & (table["subsample"] == "all")]
    moved = part[(part["protocol"] == "transfer") & part["dataset"].isin(targets)]
    rows = []
    for (source, variant, shots), group in moved.groupby(["source", "variant", "shots"]):
        place = {"source": source, "variant": variant, "shots": shots}
        own = part[
            (part["protocol"] == "fewshot")
            & (part["dataset"] == source)
            & (part["variant"] == variant)
            & (part["shots"] == shots)
        ]
        if len(own):
            rows.append({**place, "test_set": f"{source} (source)", **cell_numbers(own.iloc[0])})
        rows += [{**place, "test_set": t["dataset"], **cell_numbers(t)} for _, t in group.iterrows()]
        mean, incomplete = group["mean"].mean(), len(group) < len(targets)
        average = {"mean": mean, "incomplete": incomplete, "cell": fmt(mean, incomplete=incomplete)}
        rows.append({**place, "test_set": "average", **average})
    frame = pd.DataFrame(rows, columns=["source", "variant", "shots", "test_set", *CELL_NUMBERS])
    return frame.astype({"n_seeds": "Int64"})  # none on the average rows


def transfer_table(table: pd.DataFrame, backbone: str, targets: list[str]) -> pd.DataFrame:
    """Rows source x method x shots; columns the source's own test set, each target that was
    run and the average over the targets (marked when some were not run)."""
    return transfer_wide(transfer_cells(table, backbone, targets), targets)


def transfer_wide(numbers: pd.DataFrame, targets: list[str]) -> pd.DataFrame:
    if numbers.empty:
        return pd.DataFrame()
    wide = numbers.pivot(index=["source", "variant", "shots"], columns="test_set", values="cell")
    first = [f"{source} (source)" for source in sorted(numbers["source"].unique())]
    columns = [t for t in targets if t in set(numbers["test_set"])]
    return wide.reindex(columns=[*first, *columns, "average"]).rename_axis(columns=None).fillna("")


def harmonic_mean(base: float, new: float) -> float:
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


SIDE = {"mean": "mean", "std": "std", "n_seeds": "n"}  # what a base-to-new row has of each half
B2N_TEXT = ("base", "new", "H")


def base_to_new_cells(table: pd.DataFrame, backbone: str) -> pd.DataFrame:
    """One row per method x shots x dataset: base and new accuracy (means over seeds, with their std
    and number of seeds), H from those means; the average row is H of the average base and new
    accuracies, as in the CoCoOp paper. `base`, `new` and `H` are the text report.md prints."""
    part = table[(table["protocol"] == "base_to_new") & (table["backbone"] == backbone)]
    rows = []
    for (variant, shots), group in part.groupby(["variant", "shots"]):
        base = group[group["subsample"] == "base"].set_index("dataset")
        new = group[group["subsample"] == "new"].set_index("dataset")
        datasets = sorted(set(base.index) & set(new.index))
        for dataset in datasets:
            b, n = base.loc[dataset], new.loc[dataset]
            h = harmonic_mean(b["mean"], n["mean"])
            incomplete = bool(b["missing_seeds"] or n["missing_seeds"])
            numbers = {f"{half}_{k}": r[c] for half, r in (("base", b), ("new", n)) for k, c in SIDE.items()}
            text = {"base": cell_text(b), "new": cell_text(n), "H": fmt(h, incomplete=incomplete)}
            rows.append(
                {"variant": variant, "shots": shots, "dataset": dataset, **numbers}
                | {"harmonic_mean": h, "incomplete": incomplete, **text}
            )
        if datasets:
            b, n = base.loc[datasets], new.loc[datasets]
            incomplete = len(datasets) < len(set(base.index) | set(new.index)) or any(
                map(bool, [*b["missing_seeds"], *n["missing_seeds"]])
            )
            mb, mn = b["mean"].mean(), n["mean"].mean()
            numbers = {"base_mean": mb, "new_mean": mn, "harmonic_mean": harmonic_mean(mb, mn)}
            text = {k: fmt(v, incomplete=incomplete) for k, v in zip(B2N_TEXT, numbers.values(), strict=True)}
            rows.append(
                {"variant": variant, "shots": shots, "dataset": "average", **numbers}
                | {"incomplete": incomplete, **text}
            )
    halves = [f"{half}_{k}" for half in ("base", "new") for k in SIDE]
    columns = ["variant", "shots", "dataset", *halves, "harmonic_mean", "incomplete", *B2N_TEXT]
    return pd.DataFrame(rows, columns=columns).astype({"base_n_seeds": "Int64", "new_n_seeds": "Int64"})


def base_to_new_table(table: pd.DataFrame, backbone: str) -> pd.DataFrame:
    """Base and new accuracy per dataset x method (means over seeds), H from those means; the
    average row is H of the average base and new accuracies, as in the CoCoOp paper."""
    return base_to_new_wide(base_to_new_cells(table, backbone))


def base_to_new_wide(numbers: pd.DataFrame) -> pd.DataFrame:
    return numbers.set_index(["variant", "shots", "dataset"])[list(B2N_TEXT)]


def plot_fewshot(table: pd.DataFrame, backbone: str, dataset: str | None = None) -> Figure:
    """Accuracy against shots for one dataset (None: the average over datasets): a curve per
    method with a training set (± std over seeds), a horizontal line per training-free method."""
    part = table[(table["protocol"] == "fewshot") & (table["backbone"] == backbone)]
    if dataset is None:
        part = part.groupby(["variant", "shots", "zero_shot"], as_index=False)["mean"].mean()
        part["std"] = 0.0  # the spread over seeds is per dataset; the average has none to show
    else:
        part = part[part["dataset"] == dataset]
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    shots = sorted(part.loc[~part["zero_shot"], "shots"].unique())
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (variant, group) in enumerate(part.groupby("variant")):
        color = colors[i % len(colors)]
        if group["zero_shot"].iloc[0]:
            ax.axhline(group["mean"].iloc[0], linestyle="--", color=color, label=variant)
            continue
        group = group.sort_values("shots")
        style = {"linestyle": ":", "marker": "s"} if variant == "linear_probe" else {"marker": "o"}
        ax.errorbar(
            group["shots"],
            group["mean"],
            yerr=group["std"].fillna(0),
            label=variant,
            color=color,
            capsize=2,
            **style,
        )
    if shots:
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots, [str(s) for s in shots])
    ax.set_xlabel("labelled images per class")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{dataset or 'average over datasets'} ({backbone})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def markdown(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(none)"
    if not isinstance(frame.index, pd.RangeIndex):
        frame = frame.reset_index()
    return frame.map(as_text).to_markdown(index=False, disable_numparse=True)


def as_text(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def shots_label(shots: int) -> str:
    return "zero-shot" if shots == 0 else f"{shots}-shot"


@dataclass(frozen=True)
class ReportTable:
    """A table of the report: `text` as report.md prints it, `numbers` the cells it is formatted
    from (one row per cell: where it stands, mean, std, number of seeds... and the printed `cell`),
    which `--wandb` logs. `key` names it on W&B: `<backbone>/<table>`, `problems/<table>` or
    `searches/<the search's folder>`."""

    key: str
    title: str
    text: pd.DataFrame
    numbers: pd.DataFrame


@dataclass(frozen=True)
class Report:
    """What a report is written from: the runs (runs.csv), the tables (report.md) and the figures
    (plots/, by W&B key), the results files it could not read; `path` is report.md."""

    path: Path
    runs: pd.DataFrame | None  # None: only hyper-parameter searches, none of them tested yet
    tables: list[ReportTable]
    plots: dict[str, Path]
    unreadable: list[str]


def write_report(root: Path, out: Path | None = None) -> Path:
    """Writes runs.csv, report.md and plots/ for the readable runs under `root` (report.md lists the
    others); returns report.md."""
    return report_runs(root, out).path


def report_runs(root: Path, out: Path | None = None) -> Report:
    """`write_report`, returning what it was written from."""
    out = out or root / "report"
    searches, unreadable = read_searches(root)
    try:
        runs, unread_runs = read_runs(root)
    except ReportError:
        if not searches:  # nothing to report
            raise
        runs, unread_runs = None, []  # a search whose chosen setting is not tested yet
    unreadable += unread_runs
    (out / "plots").mkdir(parents=True, exist_ok=True)
    lines = [f"# Results under {root}", ""]
    tables, plots = [], {}
    if runs is not None:
        table = cells(runs)
        runs = runs.drop(columns=["mtime"])
        runs.to_csv(out / "runs.csv", index=False)
        lines += [f"{len(runs)} runs; runs.csv lists them all.", ""]
        for backbone in sorted(table["backbone"].unique()):
            own = tables_for(table, backbone)
            fewshot = any(t.key.endswith("/fewshot") for t in own)
            drawn = plots_for(table, backbone, out / "plots") if fewshot else {}
            lines += section_for(backbone, own, drawn)
            tables += own
            plots |= {f"{backbone}/plot_{label}": path for label, path in drawn.items()}
    if searches:
        found = search_tables(searches)
        lines += searches_section(searches, found)
        tables += found
    if runs is not None:
        found = problem_tables(runs, table)
        lines += problems(found)
        tables += [t for t in found.values() if not t.text.empty]
    if unreadable:
        lines += ["## Unreadable runs", "", "Left out of the tables above:", ""]
        lines += [f"- {problem}" for problem in unreadable] + [""]
    report = out / "report.md"
    text = "\n".join(lines) + "\n"
    atomic_write(report, lambda f: f.write(text.encode()))
    log.info("report: %s", report)
    return Report(report, runs, tables, plots, unreadable)


def tables_for(table: pd.DataFrame, backbone: str) -> list[ReportTable]:
    """The tables of one backbone, in report.md's order: few-shot and its average over datasets,
    domain generalisation and cross-dataset transfer, base-to-new; those with no runs left out."""
    tables = []
    fewshot = fewshot_cells(table, backbone)
    if not fewshot.empty:
        average = average_cells(table, backbone)
        tables += [
            ReportTable(f"{backbone}/fewshot", FEWSHOT_TITLE, fewshot_wide(fewshot), fewshot),
            ReportTable(f"{backbone}/average", "Average over datasets", average_wide(average), average),
        ]
    transferred = set(
        table.loc[(table["protocol"] == "transfer") & (table["backbone"] == backbone), "dataset"]
    )
    cross = sorted(transferred - set(DOMAIN_GENERALIZATION))
    studies = [("domain_generalisation", "Domain generalisation", list(DOMAIN_GENERALIZATION))]
    studies += [("cross_dataset", "Cross-dataset transfer", cross)]
    for key, title, targets in studies:
        if transferred & set(targets):
            numbers = transfer_cells(table, backbone, targets)
            tables.append(ReportTable(f"{backbone}/{key}", title, transfer_wide(numbers, targets), numbers))
    b2n = base_to_new_cells(table, backbone)
    if not b2n.empty:
        title = "Base-to-new (H: harmonic mean of base and new)"
        tables.append(ReportTable(f"{backbone}/base_to_new", title, base_to_new_wide(b2n), b2n))
    return tables


FEWSHOT_TITLE = "Few-shot accuracy (%), mean ± std over seeds"


def plots_for(table: pd.DataFrame, backbone: str, folder: Path) -> dict[str, Path]:
    """Draws the few-shot curves of each dataset and their average into `folder`, by label."""
    fewshot = table[(table["protocol"] == "fewshot") & (table["backbone"] == backbone)]
    plots = {}
    for dataset in [*sorted(fewshot["dataset"].unique()), None]:
        fig = plot_fewshot(table, backbone, dataset)
        plots[dataset or "average"] = path = folder / f"fewshot_{backbone}_{dataset or 'average'}.png"
        fig.savefig(path)
        plt.close(fig)
    return plots


def section_for(backbone: str, tables: list[ReportTable], plots: dict[str, Path]) -> list[str]:
    lines = [f"## {backbone}", ""]
    for table in tables:
        lines += [f"### {table.title}", "", markdown(table.text), ""]
        if table.key.endswith("/average"):  # the curves below the few-shot tables
            lines += [f"![{label}](plots/{path.name})" for label, path in plots.items()] + [""]
    return lines


def problem_tables(runs: pd.DataFrame, table: pd.DataFrame) -> dict[str, ReportTable]:
    """The settings missing seeds, the settings not run at all and the duplicated runs (each may be
    empty), by name."""
    incomplete = table[table["missing_seeds"].map(bool)]
    seeds = {c: incomplete[c].map(lambda s: ", ".join(map(str, s))) for c in ("seeds", "missing_seeds")}
    duplicates = runs[runs.duplicated([*CELL, "seed"], keep=False)]
    shown = duplicates.assign(used=~duplicates["duplicate_of_newer"])
    frames = {
        "incomplete_settings": incomplete.assign(**seeds).set_index(CELL)[["seeds", "missing_seeds"]],
        "settings_not_run": missing_settings(table),
        "duplicated_runs": shown.set_index([*CELL, "seed"])[["test_acc", "used", "path"]],
    }
    return {
        name: ReportTable(f"problems/{name}", name.replace("_", " "), frame, frame)
        for name, frame in frames.items()
    }


def problems(found: dict[str, ReportTable]) -> list[str]:
    lines = ["## Incomplete and duplicated runs", ""]
    incomplete = found["incomplete_settings"].text
    if incomplete.empty:
        lines.append("Every setting has all seeds.")
    else:
        lines += [
            f"Settings missing seeds (`{INCOMPLETE}` in the tables: the mean of the seeds present):",
            "",
        ]
        lines.append(markdown(incomplete))
    missing = found["settings_not_run"].text
    if not missing.empty:
        lines += ["", "Settings not run at all (other datasets or shots of the same method have them):", ""]
        lines.append(markdown(missing))
    duplicates = found["duplicated_runs"].text
    lines.append("")
    if duplicates.empty:
        lines.append("No run is duplicated.")
    else:
        lines += [f"Duplicated runs (`{DUPLICATED}` in the tables: only the newest of each is used):", ""]
        lines.append(markdown(duplicates))
    return lines


def read_searches(root: Path) -> tuple[dict[str, dict], list[str]]:
    """The hyper-parameter searches under `root` (their search.json, by folder relative to it) and
    a line for each search.json that cannot be read."""
    searches, unreadable = {}, []
    for file in sorted(root.rglob(SEARCH_FILE)) if root.is_dir() else []:
        try:
            data = json.loads(file.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("trials"), list):
                raise ValueError("no list of trials")
        except (OSError, UnicodeDecodeError, ValueError) as err:
            unreadable.append(f"{file}: not a readable search ({err}); delete it or run its search again")
            continue
        searches[file.parent.relative_to(root).as_posix()] = data
    return searches, unreadable


def search_tables(searches: dict[str, dict]) -> list[ReportTable]:
    """Each search's trials as a table: report.md's text (the searched values to 4 digits) and the
    numbers (W&B's, unrounded)."""
    return [
        ReportTable(
            "searches" if folder == "." else f"searches/{folder}",
            "this folder" if folder == "." else folder,
            search_table(search, digits=4),
            search_table(search),
        )
        for folder, search in searches.items()
    ]


def search_table(search: dict, digits: int | None = None) -> pd.DataFrame:
    """A row per trial: its searched settings (floats to `digits` significant digits, if given),
    validation accuracy (%, the mean over its seeds, then each seed's), state, and for the chosen
    trial its test accuracy (the only one tested)."""
    chosen = search.get("chosen") or {}
    rows = []
    for trial in search["trials"]:
        params = {
            k: f"{v:.{digits}g}" if digits and isinstance(v, float) else v for k, v in trial["params"].items()
        }
        row = {"trial": trial["trial"], **params, "val acc": trial.get("val_acc")}
        accs = trial.get("val_accs") or {}
        if len(accs) > 1:
            row |= {f"val seed {seed}": acc for seed, acc in accs.items()}
        row["state"] = trial.get("state")
        if trial.get("error"):
            row["state"] = f"{row['state']}: {trial['error']}"
        is_chosen = chosen.get("trial") == trial["trial"]
        row["chosen"] = "yes" if is_chosen else ""
        row["test acc"] = chosen.get("test_acc") if is_chosen else None
        rows.append(row)
    return pd.DataFrame(rows)


def searches_section(searches: dict[str, dict], tables: list[ReportTable]) -> list[str]:
    """report.md's section of the searches and their `search_tables`."""
    lines = ["## Hyper-parameter searches", ""]
    for search, table in zip(searches.values(), tables, strict=True):
        seeds = search.get("seeds")
        over = f"mean over seeds {', '.join(map(str, seeds))}" if seeds else "one seed"
        lines += [
            f"### {table.title}",
            "",
            f"{len(search['trials'])} trials, chosen by validation accuracy (%, {over}); only the "
            "chosen trial is tested.",
            "",
            markdown(table.text),
            "",
        ]
    return lines


def missing_settings(table: pd.DataFrame) -> pd.DataFrame:
    """Few-shot settings (dataset x shots of a method that has run elsewhere) with no run."""
    part = table[(table["protocol"] == "fewshot") & ~table["zero_shot"]]
    missing = []
    for (backbone, variant), group in part.groupby(["backbone", "variant"]):
        datasets = set(
            table.loc[(table["protocol"] == "fewshot") & (table["backbone"] == backbone), "dataset"]
        )
        have = set(zip(group["dataset"], group["shots"], strict=True))
        for dataset in sorted(datasets):
            for shots in sorted(group["shots"].unique()):
                if (dataset, shots) not in have:
                    missing.append(
                        {"backbone": backbone, "variant": variant, "dataset": dataset, "shots": shots}
                    )
    return pd.DataFrame(missing)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dir", type=Path, help="a folder with results.json files below it (a run or a sweep)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: DIR/report)")
    parser.add_argument(
        "--wandb", action="store_true", help="also log the report as one W&B run (job_type report)"
    )
    parser.add_argument(
        "--wandb-project", default=None, help="its project (default: the runs' W&B project, else coop)"
    )
    parser.add_argument(
        "--wandb-entity", default=None, help="its entity (default: the runs', else the account's)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.wandb:
            import_wandb(args.wandb_project, args.wandb_entity)  # a bad name stops it before any work
        report = report_runs(args.dir, args.out)
        if args.wandb:
            log.info("W&B: %s", log_to_wandb(report, args.dir, args.wandb_project, args.wandb_entity))
    except (ReportError, WandbReportError) as err:
        parser.exit(2, f"error: {err}\n")
    print(report.path.read_text())
    if report.unreadable:
        parser.exit(1, "".join(f"warning: {problem}\n" for problem in report.unreadable))


def log_to_wandb(report: Report, root: Path, project: str | None, entity: str | None) -> str:
    """Logs the report as one W&B run of job_type `report`, in the project its runs logged to unless
    `project` is given: every table (its cells' numbers), the figures, the runs with their W&B runs."""
    if report.runs is None:
        raise WandbReportError(f"--wandb: {root} has no tested run yet (only searches): nothing to table")
    project, entity = report_project(report.runs["wandb_run"], project, entity)
    name = f"report-{root.resolve().name}"
    config = {"dir": str(root.resolve()), "runs": len(report.runs), "unreadable": len(report.unreadable)}
    tables = {table.key: table.numbers for table in report.tables}
    return log_report(
        tables,
        report.plots,
        report.runs,
        project=project,
        entity=entity,
        name=name,
        config=config,
        folder=report.path.parent,
    )


if __name__ == "__main__":
    main()

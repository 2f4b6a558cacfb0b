"""W&B runs: where a training run records the W&B run it logged to, and the report's own W&B run.

A run trained with `logger=wandb` keeps its W&B id in its folder (`wandb_run_id`, written by
src.run.resume.ContinuedWandbLogger when its W&B run starts; runs logged before that file existed
have it in the name of their `wandb/run-<time>-<id>` folder), and its config.yaml names the project
and entity (conf/logger/wandb.yaml). `wandb_run_path` reads them back as W&B's run path,
`entity/project/id` (`project/id` where the entity was left to the account's default), which
`wandb.Api().run` takes and the W&B app shows under `/<entity>/<project>/runs/<id>`.

`log_report` logs a report (python -m src.report DIR --wandb) as one W&B run of job_type `report`:
its tables as `wandb.Table`s and its figures as `wandb.Image`s, nothing else (no weights, no
dataset images, no code). `WANDB_MODE=offline` writes the run under the report folder (or
WANDB_DIR) for a later `wandb sync`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from src.run.config import CONF_DIR

WANDB_ID_FILE = "wandb_run_id"
RUN_CONFIG = "config.yaml"  # the resolved configuration a training run writes (src.run.training)
JOB_TYPE = "report"


class WandbReportError(ValueError):
    """The report cannot be logged to W&B (no wandb package, a bad project name, no login...)."""


def wandb_run_path(folder: Path) -> str | None:
    """The W&B run a training run in `folder` logged to, as `entity/project/id` (`project/id`
    without an entity, the id alone where config.yaml no longer names the project); None for a
    run that did not log to W&B."""
    id_file = folder / WANDB_ID_FILE
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:  # wandb's own folder: wandb/run-<date>_<time>-<id> (offline-run-... when offline)
        logged = [p.name.split("run-", 1)[1] for p in folder.glob("wandb/*run-*-*/")]
        if not logged:
            return None
        run_id = max(logged).rsplit("-", 1)[1]  # the latest: <date>_<time>-<id>
    try:
        logger = yaml.safe_load((folder / RUN_CONFIG).read_text())["logger"]["wandb"]
        entity, project = logger.get("entity"), logger.get("project")
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        entity = project = None
    parts = [entity, project, run_id] if project else [run_id]
    return "/".join(str(p) for p in parts if p)


def default_logger() -> dict[str, Any]:
    """conf/logger/wandb.yaml's W&B settings (the project and entity a run logs to by default)."""
    return yaml.safe_load((Path(CONF_DIR) / "logger" / "wandb.yaml").read_text())["wandb"]


def report_project(paths: pd.Series, project: str | None, entity: str | None) -> tuple[str, str | None]:
    """The project and entity of the report's W&B run: the ones given, else those the training runs
    (their W&B run `paths`) logged to, else conf/logger/wandb.yaml's."""
    logged = [p.split("/") for p in paths.dropna() if p.count("/") >= 1]
    projects = {p[-2] for p in logged}
    if project is None and len(projects) > 1:
        raise WandbReportError(
            f"--wandb: the runs logged to several W&B projects ({', '.join(sorted(projects))}); "
            "give the report's with --wandb-project"
        )
    entities = {p[0] if len(p) == 3 else None for p in logged}
    default = default_logger()
    project = project or next(iter(projects), default["project"])
    entity = entity or (next(iter(entities)) if len(entities) == 1 else None) or default["entity"]
    return project, entity


def import_wandb(project: str | None = None, entity: str | None = None) -> Any:
    """The wandb module, after checking the given project and entity names (one clear error before
    any work is done)."""
    try:
        import wandb
    except ImportError as err:
        raise WandbReportError(f"--wandb needs the wandb package ({err}): pip install wandb") from err
    try:
        wandb.Settings(project=project, entity=entity)
    except wandb.errors.Error as err:
        raise WandbReportError(f"--wandb-project/--wandb-entity: {err}") from err
    return wandb


def log_report(
    tables: Mapping[str, pd.DataFrame],
    images: Mapping[str, Path],
    runs: pd.DataFrame,
    *,
    project: str,
    entity: str | None,
    name: str,
    config: Mapping[str, Any],
    folder: Path,
) -> str:
    """Logs the report as one W&B run of job_type `report` in `project`: each table under its key,
    each figure (a PNG file) under its key, and the runs as `runs` with a `wandb_url` column beside
    their `wandb_run` where the entity is known. The run's files go to `folder`/wandb/ (or
    WANDB_DIR). Returns the run's URL, or its folder when offline."""
    wandb = import_wandb(project, entity)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        run = wandb.init(
            project=project,
            entity=entity,
            name=name,
            job_type=JOB_TYPE,
            tags=[JOB_TYPE],
            config=dict(config),
            dir=os.environ.get("WANDB_DIR", str(folder)),
            settings=wandb.Settings(save_code=False, console="off"),
        )
    except wandb.errors.Error as err:
        raise WandbReportError(
            f"--wandb: W&B did not start the report's run: {err} (or log offline: WANDB_MODE=offline, "
            "then `wandb sync`)"
        ) from err
    try:
        app = run.settings.app_url if run.entity else None
        linked = runs.assign(wandb_url=[run_url(app, path, run.entity) for path in runs["wandb_run"]])
        logged = {key: table(wandb, frame) for key, frame in tables.items()}
        logged["runs"] = table(wandb, linked)
        logged |= {key: wandb.Image(str(path)) for key, path in images.items()}
        run.log(logged)
        where = run.url or str(Path(run.dir).parent)
    finally:
        run.finish()
    return where


def run_url(app: str | None, path: object, entity: str) -> str | None:
    """The W&B app's page of a training run (its run `path`), where its entity is known: its own, or
    the logged-in account's (the report's) for a run that left it to the default."""
    if app is None or not isinstance(path, str) or "/" not in path:
        return None
    parts = path.split("/")
    entity = parts[0] if len(parts) == 3 else entity
    return f"{app}/{entity}/{parts[-2]}/runs/{parts[-1]}"


def table(wandb: Any, frame: pd.DataFrame) -> Any:
    """A DataFrame (its index as the first columns) as a wandb.Table: missing values None, numpy
    scalars Python's, tuples and lists as text (`1, 2`), dicts as JSON. (wandb.Table(dataframe=...)
    keeps NaN, which its table file then holds as `NaN`, not JSON, and the seeds' tuples as lists.)"""
    if not isinstance(frame.index, pd.RangeIndex):
        frame = frame.reset_index()
    rows = [[plain(value) for value in row] for row in frame.itertuples(index=False)]
    return wandb.Table(columns=[str(c) for c in frame.columns], data=rows, allow_mixed_types=True)


def plain(value: object) -> object:
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (tuple, list)):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value)
    return value

"""`hydra/sweeper=grid`: Hydra's basic sweeper without the runs that would repeat another run, and
whose failed runs do not stop the sweep.

A benchmark grid sweeps keys that some methods do not depend on (zero-shot CLIP gives the same
result for every shot count, seed and context variant) or whose other values do not apply to
them (CoOp trains on ImageNet, not on the test-only sets swept for zero-shot CLIP). The cartesian
product would launch such a run once per combination; `once` names these keys per method, and
its runs are launched only at the first value of each:

    hydra:
      sweeper:
        params: {method: "coop,zeroshot", shots: "'1','2'", seed: "1,2"}
        once:
          method=zeroshot: [shots, seed]   # one zero-shot run, at shots='1' seed=1

With `pack=true` (the presets' setting), the runs that differ only in seed and context settings
are launched as one job per pack (src/packing/jobs.py), trained together (src/packing/train.py).

Hydra's basic sweeper stops at the first batch with a failed run and reports that run only. Here
every batch runs; the sweep then ends with one line per failed run, naming it by its number and
swept values, and the others keep their results (src.run.cli.FailedRuns).

(Hydra loads sweepers only from the `hydra_plugins` package, hence this one's place.)
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig, OmegaConf

from src.packing.jobs import group_jobs
from src.run.cli import FailedRuns, user_error

log = logging.getLogger(__name__)


class GridSweeper(BasicSweeper):
    """Every combination of `params` (as Hydra's basic sweeper), less the repeats that `once` names."""

    def __init__(
        self,
        max_batch_size: int | None = None,
        params: dict[str, str] | None = None,
        once: dict[str, list[str]] | None = None,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.once = {trigger: list(keys) for trigger, keys in (once or {}).items()}

    def split_arguments(self, overrides: list[Override], max_batch_size: int | None) -> list[list[list[str]]]:
        (jobs,) = BasicSweeper.split_arguments(overrides, None)
        kept = drop_repeats(jobs, self.once)
        if len(kept) < len(jobs):
            log.info(
                "%d runs; %d more would repeat one of them (hydra.sweeper.once)",
                len(kept),
                len(jobs) - len(kept),
            )
        kept = drop_context_repeats(kept, self._compose)
        if self.config.get("pack"):  # runs that differ only in seed and context: one job each pack
            kept = group_jobs(kept, self._compose, int(self.config.get("pack_size", 12)))
        return list(BasicSweeper.split_overrides_to_chunks(kept, max_batch_size))

    def _compose(self, job: list[str]) -> DictConfig:
        """A job's config, as the launcher will compose it."""
        return self.hydra_context.config_loader.load_sweep_config(self.config, job)

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        """BasicSweeper.sweep, except that a batch with a failed run does not end the sweep."""
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        params = self._parse_config() + list(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        self.overrides = self.split_arguments(parser.parse_overrides(params), self.max_batch_size)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        swept = swept_keys([job for batch in self.overrides for job in batch])
        returns: list[Sequence[JobReturn]] = []
        failures: list[tuple[str, BaseException]] = []
        first = 0
        while not self.is_done():
            batch = self.get_job_batch()
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=first)
            for index, (job, result) in enumerate(zip(batch, results, strict=True), first):
                if result.status == JobStatus.FAILED:
                    # the error itself: `return_value` would print Hydra's line and raise it
                    failures.append((run_name(index, job, swept), result._return_value))
            first += len(batch)
            returns.append(results)
        if failures:
            bugs = [err for _, err in failures if user_error(err) is None]
            raise FailedRuns(failures, first) from (bugs or [failures[0][1]])[0]
        return returns


def swept_keys(jobs: list[list[str]]) -> list[str]:
    """The keys whose values differ between the jobs (lists of `key=value`), in their order."""
    values: dict[str, set[str]] = {}
    for job in jobs:
        for item in job:
            key, _, value = item.partition("=")
            values.setdefault(key, set()).add(value)
    return [key for key, seen in values.items() if len(seen) > 1]


def run_name(index: int, job: Sequence[str], swept: list[str]) -> str:
    """'#3 (shots=4 seed=2)': the run's number in the sweep and its swept values."""
    shown = [item for item in job if item.partition("=")[0] in swept] or list(job)
    return f"#{index} ({' '.join(shown)})"


def drop_context_repeats(
    jobs: list[list[str]], compose: Callable[[list[str]], DictConfig]
) -> list[list[str]]:
    """The jobs, less those that differ from an earlier one only in context settings (`ctx=...`,
    `ctx.*=...`) when the method's config takes nothing from the context (zero-shot CLIP, the
    linear probe, CLIP-LoRA, a method of one's own without one): the same run, launched once; the
    log says so once per method. `compose` gives a job's config."""
    first: dict[tuple[str, ...], list[str]] = {}
    context_free: dict[tuple[str, ...], str | None] = {}  # the method's name when it takes no context
    skipped: dict[str, int] = defaultdict(int)
    kept = []
    for job in jobs:
        rest = tuple(item for item in job if item.partition("=")[0].split(".")[0].lstrip("+~") != "ctx")
        if rest not in first:
            first[rest] = job
            kept.append(job)
            continue
        if rest not in context_free:
            method = compose(first[rest]).method
            takes = "${ctx." in json.dumps(OmegaConf.to_container(method, resolve=False))
            context_free[rest] = None if takes else str(method.name)
        if context_free[rest] is None:
            kept.append(job)
        else:
            skipped[context_free[rest]] += 1
    for name, count in skipped.items():
        log.info(
            "method=%s takes nothing from the context: %d runs that differ only in ctx are launched once",
            name,
            count,
        )
    return kept


def drop_repeats(jobs: list[list[str]], once: dict[str, list[str]]) -> list[list[str]]:
    """The jobs (lists of `key=value`) minus those that match a trigger of `once` and differ from
    the first job in one of the keys listed for it."""
    first = dict(override.split("=", 1) for override in jobs[0]) if jobs else {}

    def repeats(job: list[str]) -> bool:
        values = dict(override.split("=", 1) for override in job)
        return any(
            trigger in job and any(values.get(key) != first[key] for key in keys if key in first)
            for trigger, keys in once.items()
        )

    return [job for job in jobs if not repeats(job)]

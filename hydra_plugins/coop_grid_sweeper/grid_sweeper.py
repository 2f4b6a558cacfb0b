"""`hydra/sweeper=grid`: Hydra's basic sweeper without the runs that would repeat another run.

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
are launched as one job per pack (src/pack_jobs.py), trained together (src/packing.py).

(Hydra loads sweepers only from the `hydra_plugins` package, hence this one's place.)
"""

from __future__ import annotations

import logging

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig

from src.pack_jobs import group_jobs

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
        if self.config.get("pack"):  # runs that differ only in seed and context: one job each pack
            kept = group_jobs(kept, self._compose, int(self.config.get("pack_size", 12)))
        return list(BasicSweeper.split_overrides_to_chunks(kept, max_batch_size))

    def _compose(self, job: list[str]) -> DictConfig:
        """A job's config, as the launcher will compose it."""
        return self.hydra_context.config_loader.load_sweep_config(self.config, job)


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

"""`hydra/sweeper=optuna`: a search of hyper-parameters for the highest validation accuracy, by
Optuna, each trial launched as a job of the configured launcher (in this process, `local` through
submitit, `slurm`), then the chosen setting tested, alone.

    python -m src.train -m hparams_search=coop_optuna dataset=dtd shots=16 seeds=1,2,3

`hydra.sweeper.params` (conf/hparams_search/*.yaml) and the command line give the search space in
Hydra's sweep syntax: `choice(4,8,16)` (or `4,8,16`) and `range(...)` are categorical,
`interval(a,b)` a float (`int(interval(a,b))` an integer), `tag(log,interval(...))` on a log scale;
a plain value is fixed for every trial, and the command line's keys replace the config's. `seeds`
is never searched: `seeds=1,2,3` (or `[1,2,3]`) gives the seeds every trial trains, whose mean
validation accuracy is the trial's score (src/run/search.py).

A trial's job trains and validates its last model, and never tests it. After the last trial, one
more job tests the chosen trial's runs (the highest mean validation accuracy; the earliest of
equals), continuing them from their last checkpoint, so that they end as runs of that setting
launched alone (results.json). The sweep folder holds:

    search.json   every trial: its settings, state, validation accuracy per seed and mean (the
                  table src.report draws), rewritten after each batch of trials
    best.json     the chosen trial: its settings, validation and test accuracies, run folders
    best.yaml     the same, and the command that trains the setting as a run of its own
    trial<N>/     a trial's job: its log, and a run folder per seed (seed<S>/)
    chosen/       the log of the job that tested the chosen trial

A trial that fails (a diverging learning rate, a bad option) is a warning line naming it; the
others go on. The search fails (one line per trial) only when no trial finished.

Why not the hydra-optuna-sweeper plugin, as the lightning-hydra-template uses: it pins optuna<3
(2.10, from 2021; the study files of that version fail on SQLAlchemy 2, so a search could not be
continued), and the study it runs is local to its `sweep`, with no way to test the chosen trial
after it. The optuna library itself is used here as it documents its ask-and-tell interface.
(Hydra loads sweepers only from the `hydra_plugins` package, hence this one's place.)
"""

from __future__ import annotations

import logging
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, QuotedString, Transformer
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from src.common.files import atomic_write, write_json
from src.run.cli import FailedRuns, user_error
from src.run.search import SearchError

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

SEEDS = "seeds"  # the key of the seeds a trial averages: never a dimension of the search
CHOSEN = "search.chosen"  # a trial's: null; the job that tests the chosen trial: that trial's folder
CHOSEN_SUBDIR = "chosen"  # that job's own folder in the sweep folder
SEARCH_FILE, BEST_JSON, BEST_YAML = "search.json", "best.json", "best.yaml"
# What each trial stores in the study, besides its parameters and value.
TRIAL_ATTRS = ("overrides", "val_accs", "dir", "error")


# Hydra imports every module of hydra_plugins whenever a command starts: optuna is imported where it
# is used, and the classes here are not dataclasses (Hydra's import leaves them without a module).


class Dimension(NamedTuple):
    """One searched key: its Optuna distribution, and how a sampled value is written as an override
    (a categorical value as the text it was given as: `texts`, in the order of its choices)."""

    key: str
    distribution: optuna.distributions.BaseDistribution
    texts: tuple[str, ...] = ()

    def override(self, value: Any) -> str:
        if self.texts:
            return f"{self.key}={self.texts[self.distribution.choices.index(value)]}"
        return f"{self.key}={value!r}"


class SearchSpace(NamedTuple):
    """The searched dimensions, the overrides every trial gets, and the seeds each trial trains."""

    dimensions: tuple[Dimension, ...]
    fixed: tuple[str, ...]
    seeds: tuple[int, ...] | None

    def trial_overrides(self, params: dict[str, Any]) -> list[str]:
        """A trial's overrides (`++`: the keys exist in hparams_search configs; added without one)."""
        seeds = [f"++{SEEDS}=[{','.join(map(str, self.seeds))}]"] if self.seeds else []
        return [*self.fixed, *seeds, *(d.override(params[d.key]) for d in self.dimensions)]


def search_space(arguments: list[str], parser: OverridesParser) -> SearchSpace:
    """The search space of `key=value` overrides (the config's params first, then the command
    line's, whose keys replace them): sweeps are dimensions, plain values fixed; `seeds`, a list or a
    sweep of integers, the seeds of every trial. SearchError names an override that cannot be searched."""
    parsed: dict[str, Override] = {}
    for override in parser.parse_overrides(arguments):
        parsed.pop(override.get_key_element(), None)  # the later one, in the order given
        parsed[override.get_key_element()] = override
    dimensions, fixed, seeds = [], [], None
    for key, override in parsed.items():
        if override.key_or_group == SEEDS:
            seeds = seed_list(override)
        elif not override.is_sweep_override():
            fixed.append(override.input_line)
        else:
            dimensions.append(dimension(key, override))
    if not dimensions:
        raise SearchError(
            "the search has nothing to search: give hydra.sweeper.params (an hparams_search= config) "
            "or a sweep on the command line, e.g. 'method.optimizer.lr=tag(log,interval(1e-4,1e-2))'"
        )
    return SearchSpace(tuple(dimensions), tuple(fixed), seeds)


def dimension(key: str, override: Override) -> Dimension:
    import optuna

    value = override.value()
    if override.is_interval_sweep():
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            distribution = optuna.distributions.IntDistribution(value.start, value.end, log=log_scale)
        else:
            distribution = optuna.distributions.FloatDistribution(value.start, value.end, log=log_scale)
        return Dimension(key, distribution)
    if override.is_choice_sweep() or override.is_range_sweep():
        try:
            values = list(override.sweep_iterator())
            texts = tuple(str(t) for t in override.sweep_iterator(transformer=Transformer.encode))
        except Exception:  # a glob() the parser cannot list
            values = None
        if values:
            choices = tuple(v.text if isinstance(v, QuotedString) else v for v in values)
            if all(isinstance(v, (int, float, str, bool)) or v is None for v in choices):
                return Dimension(key, optuna.distributions.CategoricalDistribution(choices), texts)
    raise SearchError(
        f"{override.input_line}: a search takes choice(...), range(...) and interval(...) of plain "
        "values; list the values, e.g. 'ctx.n_ctx=choice(4,8,16)'"
    )


def seed_list(override: Override) -> tuple[int, ...]:
    value = override.value()
    if override.is_choice_sweep() or override.is_range_sweep():
        values = list(override.sweep_iterator())
    else:
        values = list(value) if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise SearchError(
            f"{override.input_line}: seeds are integers, the seeds every trial trains, e.g. seeds=1,2,3"
        )
    return tuple(values)


class OptunaSweeper(Sweeper):
    """The search of the module docstring."""

    def __init__(
        self,
        params: dict[str, str] | None = None,
        n_trials: int = 20,
        n_jobs: int = 1,
        sampler: optuna.samplers.BaseSampler | None = None,
        storage: str | None = None,
        study_name: str = "search",
    ) -> None:
        self.params = dict(params or {})
        self.n_trials = int(n_trials)
        self.n_jobs = int(n_jobs)
        self.sampler = sampler
        self.storage = storage
        self.study_name = study_name
        self.config: DictConfig | None = None
        self.launcher: Any = None
        self.hydra_context: HydraContext | None = None
        self.failures: dict[int, BaseException] = {}  # this launch's failed trials, by number
        self.sweep_dir = Path()

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    def sweep(self, arguments: list[str]) -> dict[str, Any]:
        import optuna

        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        if self.n_trials < 1 or self.n_jobs < 1:
            raise SearchError(
                f"hydra.sweeper.n_trials={self.n_trials}, hydra.sweeper.n_jobs={self.n_jobs}: both are "
                "at least 1"
            )
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        space = search_space([f"{k}={v}" for k, v in self.params.items()] + list(arguments), parser)
        sweep_dir = self.sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        study = self.study(space)
        log.info(
            "searching %s over %d trials for the highest validation accuracy%s; study: %s",
            ", ".join(d.key for d in space.dimensions),
            self.n_trials,
            f" (mean over seeds {', '.join(map(str, space.seeds))})" if space.seeds else "",
            self.storage or "in memory",
        )
        while (left := self.n_trials - len(study.trials)) > 0:
            distributions = {d.key: d.distribution for d in space.dimensions}
            trials = [study.ask(distributions) for _ in range(min(left, self.n_jobs))]
            batch = [space.trial_overrides(trial.params) for trial in trials]
            for trial, overrides in zip(trials, batch, strict=True):
                trial.set_user_attr("overrides", overrides)
            jobs = [[*overrides, f"++{CHOSEN}=null"] for overrides in batch]
            results = self.launcher.launch(jobs, initial_job_idx=trials[0].number)
            for trial, result in zip(trials, results, strict=True):
                self.tell(study, trial, result)
            write_search(sweep_dir, study, space)
        finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if not finished:  # each trial's error: a line each, or the traceback of a bug
            failures = [(trial_name(t), self.trial_error(t)) for t in study.trials]
            raise FailedRuns(failures, len(failures))
        return self.test_chosen(study, space, sweep_dir)

    def trial_error(self, trial: optuna.trial.FrozenTrial) -> BaseException:
        """A failed trial's error: this launch's, or the line an earlier launch stored."""
        return self.failures.get(trial.number) or SearchError(trial.user_attrs.get("error", "failed"))

    def study(self, space: SearchSpace) -> optuna.Study:
        """A new study, or the one in `storage` if made by the same search (its trials count
        towards n_trials; those an earlier launch left running are marked failed)."""
        import optuna

        optuna.logging.disable_default_handler()  # its lines go to the log file; the trials' are ours
        optuna.logging.enable_propagation()
        setting = {"fixed": list(space.fixed), "seeds": list(space.seeds or [])}
        study = optuna.create_study(
            storage=self.storage,
            study_name=self.study_name,
            sampler=self.sampler,
            direction="maximize",
            load_if_exists=True,
        )
        stored = study.user_attrs.get("setting")
        if stored is None:
            study.set_user_attr("setting", setting)
        elif stored != setting:
            raise SearchError(
                f"hydra.sweeper.storage={self.storage} holds a search of other fixed settings or seeds "
                f"({stored}): give this search its own folder with hydra.sweep.dir=<folder>"
            )
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            log.warning("trial #%d was left unfinished by an earlier launch: counted as failed", trial.number)
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        return study

    def tell(self, study: optuna.Study, trial: optuna.Trial, result: JobReturn) -> None:
        """The trial's score (the mean validation accuracy its job returned), or its failure."""
        import optuna

        name = trial_name(trial)
        if result.status == JobStatus.COMPLETED:
            value = result.return_value
            trial.set_user_attr("val_accs", value["val_accs"])
            trial.set_user_attr("dir", relative(value["dir"], self.sweep_dir))  # the folder may move
            study.tell(trial, value["val_acc"])
            log.info("trial %s: validation accuracy %.2f%%", name, value["val_acc"])
            return
        error = result._return_value  # the error itself: `return_value` would raise it
        self.failures[trial.number] = error
        message = user_error(error) or f"{type(error).__name__}: {error}"
        trial.set_user_attr("error", " ".join(message.splitlines()))
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        log.warning("trial %s failed: %s", name, " ".join(message.splitlines()))

    def test_chosen(self, study: optuna.Study, space: SearchSpace, sweep_dir: Path) -> dict[str, Any]:
        """Tests the trial of the highest validation accuracy (one job), writes best.json and best.yaml."""
        best = study.best_trial
        folder = (sweep_dir / best.user_attrs["dir"]).resolve()
        overrides = [*best.user_attrs["overrides"], f"++{CHOSEN}={quoted(str(folder))}"]
        log.info("chosen: trial %s (validation %.2f%%); testing it", trial_name(best), best.value)
        (result,) = self.launcher.launch(
            [[*overrides, f"hydra.sweep.subdir={CHOSEN_SUBDIR}"]], initial_job_idx=len(study.trials)
        )
        tested = result.return_value  # a failed test raises its error here, with its traceback
        chosen = {
            "trial": best.number,
            "params": best.params,
            "seeds": list(space.seeds) if space.seeds else None,
            "val_acc": best.value,
            "val_accs": best.user_attrs["val_accs"],
            "test_acc": tested["test_acc"],
            "test_accs": tested["test_accs"],
            "runs": [relative(run, sweep_dir) for run in tested["runs"]],
            "overrides": best.user_attrs["overrides"],
        }
        write_json(sweep_dir / BEST_JSON, chosen)
        write_best_yaml(sweep_dir / BEST_YAML, chosen, space)
        write_search(sweep_dir, study, space, chosen)
        log.info(
            "chosen setting %s: validation %.2f%%, test %.2f%%; %s",
            " ".join(d.override(best.params[d.key]) for d in space.dimensions),
            best.value,
            tested["test_acc"],
            sweep_dir / BEST_JSON,
        )
        return chosen


def trial_name(trial: optuna.trial.FrozenTrial | optuna.Trial) -> str:
    """'#3 (ctx.n_ctx=8 method.optimizer.lr=0.0031)': the trial's number and sampled values."""
    shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    return f"#{trial.number} ({shown})"


def quoted(text: str) -> str:
    """A value for an override, quoted so that Hydra's grammar takes it whole."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def relative(path: str, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path


def write_search(
    sweep_dir: Path, study: optuna.Study, space: SearchSpace, chosen: dict[str, Any] | None = None
) -> None:
    """search.json: the search and every trial (src.report tables it)."""
    import optuna

    trials = []
    for trial in study.get_trials(deepcopy=False):
        mean = trial.value if trial.state == optuna.trial.TrialState.COMPLETE else None
        row = {"trial": trial.number, "state": trial.state.name.lower(), "params": trial.params}
        row |= {"val_acc": mean} | {key: trial.user_attrs.get(key) for key in TRIAL_ATTRS}
        trials.append(row)
    write_json(
        sweep_dir / SEARCH_FILE,
        {
            "metric": "val_acc",  # mean validation accuracy (%) over the seeds
            "direction": "maximize",
            "space": {d.key: repr(d.distribution) for d in space.dimensions},
            "fixed": list(space.fixed),
            "seeds": list(space.seeds) if space.seeds else None,
            "n_trials": len(trials),
            "trials": trials,
            "chosen": chosen,
        },
    )


def write_best_yaml(path: Path, chosen: dict[str, Any], space: SearchSpace) -> None:
    """best.yaml: the chosen setting, its accuracies, and the command that trains it alone."""
    setting = [o for o in space.fixed if not o.startswith(("hparams_search=", "hydra.", "hydra/"))]
    setting += [d.override(chosen["params"][d.key]) for d in space.dimensions]
    seeds = space.seeds or ()
    if len(seeds) > 1:
        setting = ["-m", *setting, f"seed={','.join(map(str, seeds))}"]
    elif seeds:
        setting.append(f"seed={seeds[0]}")
    # shots='2' as src.train's command line quotes it for Hydra: shots=2 is what one types
    typed = [re.sub(r"^([^=]+)='([\w.-]*)'$", r"\1=\2", o) for o in setting]
    data = {
        "params": chosen["params"],
        "val_acc": round(chosen["val_acc"], 4),
        "test_acc": round(chosen["test_acc"], 4),
        "trial": chosen["trial"],
        "command": "python -m src.train " + " ".join(shlex.quote(o) for o in typed),
    }
    text = "# The setting of the highest validation accuracy, then tested (best.json: per seed)\n"
    text += yaml.safe_dump(data, sort_keys=False)
    atomic_write(path, lambda f: f.write(text.encode()))

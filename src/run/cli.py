"""The command-line entry points' error report: a mistake the user can fix is one line.

Hydra prints composition errors over many lines (the options, the config search path) and other
errors as tracebacks. `run` prints `error: <what>: <what to do>` on stderr and exits with status 2
for: an unknown config option (with the valid ones), an error this project raises about a value,
file or folder (each message names the option and the fix), a job that sbatch refuses (with the
hydra.launcher option that changes it), and a file the system refuses. Anything
else is a bug and keeps its traceback; HYDRA_FULL_ERROR=1 shows the traceback of every error.

The fixes a message prints are command-line overrides that work when pasted as printed
(src/common/messages.py). A sweep's failed runs are each one line naming the run
(hydra_plugins/coop_grid_sweeper); the others run to the end and keep their results.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException

from src.run.cluster import sbatch_refusal

EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + signal.SIGTERM  # as a shell reports a process that SIGTERM ended
NO_ROOM = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # writes the system refuses for want of room

# Errors of these kinds raised by project code are on purpose, each message naming the option or
# file and the fix; so are the project's own exception classes (DatasetError, NonFiniteLossError, ...).
PROJECT_ERRORS = (ValueError, OSError)


def run(hydra_main: Callable[[], Any]) -> None:
    """Runs a `@hydra.main` function (whose task is decorated with `task`), reporting errors as the
    module docstring says."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        hydra_main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then raises errors instead of printing them
    error = None
    try:
        hydra_main()
    except _RunFailed as failed:
        error = failed.error
    except Exception as err:
        error = err
    finally:
        del os.environ["HYDRA_FULL_ERROR"]
    if error is None:
        return
    message = user_error(error, task=getattr(hydra_main, "__wrapped__", None))
    if message is None:
        raise error
    print_errors(message)
    interrupted = any(isinstance(cause, Interrupted) for cause in _chain(error))
    raise SystemExit(EXIT_INTERRUPTED if interrupted else EXIT_USAGE)


def print_errors(message: str) -> None:
    """A message's lines on stderr, each as `error: <line>`."""
    for line in message.splitlines():
        sys.stderr.write(f"error: {line}\n")


class _RunFailed(BaseException):  # noqa: N818  (not an error of its own: it carries one)
    """A single run's error on its way to `run`. Hydra's run_job catches every Exception of a task
    and raises it again after printing "Error executing job with overrides: [...]"; this one passes
    through, so the error's own line is the only one."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


Task = TypeVar("Task", bound=Callable[..., Any])


def task(function: Task) -> Task:
    """The task function of an entry point, under its `@hydra.main`: in a single run its error
    reaches `run` without Hydra's line before it; in a sweep it stays the run's error, which the
    sweeper reports (hydra_plugins/coop_grid_sweeper), except a run stopped by SIGTERM: the job
    process exits with status 143 and no result, as a job that SLURM (or submitit) requeues must,
    so that the requeued job continues it."""

    @functools.wraps(function)
    def reported(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except Exception as err:
            if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.RUN:
                raise _RunFailed(err) from None
            if isinstance(err, Interrupted):
                print_errors(str(err))
                raise SystemExit(EXIT_INTERRUPTED) from err
            raise

    return reported  # type: ignore[return-value]


class Interrupted(Exception):  # noqa: N818  (named as the user reads it)
    """The run was stopped by SIGTERM (what SLURM sends at a preemption or a time limit): one line
    saying where it will continue from, and exit status 143 (128 + SIGTERM), so that a scheduler,
    a sweep or a script sees that it did not finish."""


class UserErrors(ValueError):
    """Several mistakes found at once (src.run.checks), each reported on a line of its own."""

    def __init__(self, messages: list[str]) -> None:
        super().__init__("\n".join(messages))
        self.messages = messages


class FailedRuns(Exception):  # noqa: N818  (named as the user reads it)
    """Runs of a sweep that failed, each with its error; the sweep's other runs ran to the end."""

    def __init__(self, failures: list[tuple[str, BaseException]], total: int) -> None:
        self.failures = failures
        self.total = total
        lines = [f"run {name}: {_one_line(str(err)) or type(err).__name__}" for name, err in failures]
        super().__init__("\n".join([*lines, self.summary]))

    @property
    def summary(self) -> str:
        failed = len(self.failures)
        return f"{failed} of {self.total} runs failed; the other {self.total - failed} kept their results"


def user_error(err: BaseException, task: Callable | None = None) -> str | None:
    """The one-line message for an error the user can fix (a line each for UserErrors and for the
    failed runs of a sweep), None for anything else (a bug)."""
    if isinstance(err, FailedRuns):
        messages = [(name, user_error(error)) for name, error in err.failures]
        if any(message is None for _, message in messages):
            return None  # a bug in a run: its traceback (FailedRuns is raised from it)
        lines = [f"run {name}: {line}" for name, message in messages for line in message.splitlines()]
        return "\n".join([*lines, err.summary])
    for cause in _chain(err):
        if isinstance(cause, UserErrors):
            return "\n".join(cause.messages)
        if isinstance(cause, Interrupted):  # a line per run (of a pack)
            return str(cause)
        if _project_class(cause) or _raised_on_purpose(cause):
            return _one_line(str(cause))
        refused = sbatch_refusal(cause)
        if refused is not None:
            return refused
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options:
        group, _, choice = err.missing_cfg_file.rpartition("/")
        message = f"{group}={choice}: unknown {group} option; choose one of: {', '.join(err.options)}"
        if group == "method":
            message += (
                "; a method of your own package: its method/<name>.yaml under a folder given with "
                "'hydra.searchpath=[file://<folder>]', and the folder holding its package on PYTHONPATH"
            )
        return message
    required = re.match(r"You must specify '([^']+)'", str(err))
    if isinstance(err, HydraException) and required:
        options = [line.strip() for line in str(err).splitlines() if line.startswith("\t")]
        return f"{required[1]} is required; choose one of: {', '.join(options)}"
    if isinstance(err, (HydraException, OmegaConfBaseException)):
        text = str(err).split("Config search path:")[0]
        if isinstance(err.__cause__, OmegaConfBaseException):
            text += f" ({err.__cause__})"
        return _one_line(text)
    if isinstance(err, OSError) and err.filename is not None:
        message = f"{err.filename}: {err.strerror or err}"
        if task is not None and not _raised_within(err, task):
            # Hydra failed before the run started: creating the run folder or its log file
            message += (
                "; choose a writable run folder with hydra.run.dir=<folder> (or paths.log_dir=<folder>)"
            )
        return message
    if isinstance(err, OSError) and err.errno in NO_ROOM:  # a library's write, which names no file
        folder = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else "the run folder"
        return (
            f"{err.strerror or err} while writing a file of {folder} (a full disk, a file-size limit or a "
            "quota): free space and run the same command again, or write elsewhere: hydra.run.dir=<folder>"
        )
    return None


def _chain(err: BaseException) -> Iterator[BaseException]:
    while err is not None:
        yield err
        # OmegaConf raises a resolver's error as the context of its own error, not as its cause
        resolving = isinstance(err, InterpolationResolutionError)
        err = err.__cause__ or (err.__context__ if resolving else None)


def _frames(err: BaseException) -> Iterator[Any]:
    tb = err.__traceback__
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next


def _raised_by_project(err: BaseException) -> bool:
    """Raised by a `raise` in this project's code (the innermost frame is in `src.`), not by a library."""
    frames = list(_frames(err))
    if not frames:
        return False
    spec = frames[-1].f_globals.get("__spec__")  # `python -m src.train` runs as __main__
    return (spec.name if spec else frames[-1].f_globals.get("__name__", "")).startswith("src.")


def _raised_on_purpose(err: BaseException) -> bool:
    # OmegaConf's errors are ValueErrors too, re-raised with the traceback of the error they wrap
    wrapper = isinstance(err, (OmegaConfBaseException, HydraException))
    return isinstance(err, PROJECT_ERRORS) and not wrapper and _raised_by_project(err)


def _project_class(err: BaseException) -> bool:
    return type(err).__module__.startswith("src.")


def _raised_within(err: BaseException, function: Callable) -> bool:
    return any(frame.f_code is function.__code__ for frame in _frames(err))


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())

"""The command-line entry points' error report: a mistake the user can fix is one line.

Hydra prints composition errors over many lines (the options, the config search path) and other
errors as tracebacks. `run` prints `error: <what>: <what to do>` on stderr and exits with status 2
for: an unknown config option (with the valid ones), an error this project raises about a value,
file or folder (each message names the option and the fix), a job that sbatch refuses (with the
hydra.launcher option that changes it), and a file the system refuses. Anything
else is a bug and keeps its traceback; HYDRA_FULL_ERROR=1 shows the traceback of every error.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

from hydra.errors import HydraException, MissingConfigException
from omegaconf.errors import OmegaConfBaseException

from src.cluster import sbatch_refusal

EXIT_USAGE = 2

# Errors of these kinds raised by project code are on purpose, each message naming the option or
# file and the fix; so are the project's own exception classes (DatasetError, NonFiniteLossError, ...).
PROJECT_ERRORS = (ValueError, OSError)


def run(hydra_main: Callable[[], Any]) -> None:
    """Runs a `@hydra.main` function, reporting errors as the module docstring says."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        hydra_main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then raises errors instead of printing them
    try:
        hydra_main()
    except Exception as err:
        message = user_error(err, task=getattr(hydra_main, "__wrapped__", None))
        if message is None:
            raise
        for line in message.splitlines():
            sys.stderr.write(f"error: {line}\n")
        raise SystemExit(EXIT_USAGE) from None
    finally:
        del os.environ["HYDRA_FULL_ERROR"]


class UserErrors(ValueError):
    """Several mistakes found at once (src.precheck), each reported on a line of its own."""

    def __init__(self, messages: list[str]) -> None:
        super().__init__("\n".join(messages))
        self.messages = messages


def user_error(err: BaseException, task: Callable | None = None) -> str | None:
    """The one-line message for an error the user can fix (a line each for UserErrors), None for
    anything else (a bug)."""
    for cause in _chain(err):
        if isinstance(cause, UserErrors):
            return "\n".join(cause.messages)
        if _project_class(cause) or (isinstance(cause, PROJECT_ERRORS) and _raised_by_project(cause)):
            return _one_line(str(cause))
        refused = sbatch_refusal(cause)
        if refused is not None:
            return refused
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options:
        group, _, choice = err.missing_cfg_file.rpartition("/")
        return f"{group}={choice}: unknown {group} option; choose one of: {', '.join(err.options)}"
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
    return None


def _chain(err: BaseException) -> Iterator[BaseException]:
    while err is not None:
        yield err
        err = err.__cause__


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


def _project_class(err: BaseException) -> bool:
    return type(err).__module__.startswith("src.")


def _raised_within(err: BaseException, function: Callable) -> bool:
    return any(frame.f_code is function.__code__ for frame in _frames(err))


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())

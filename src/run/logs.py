"""Quiet logs: a run prints the project's lines; what libraries say about their internals goes to
the run's log file, and the warnings this project causes on purpose are silenced where raised.

The console filter is set up by Hydra (conf/hydra/job_logging/quiet.yaml); the warnings filters by
the commands that run a Lightning Trainer (`silence_known_warnings`), in every process of a sweep.
"""

from __future__ import annotations

import logging
import sys
import warnings

# The loggers of this project: its modules, the module run with `python -m`, the sweeper plugin.
PROJECT_LOGGERS = ("src.", "hydra_plugins.")
PROJECT_MAIN = "__main__"
# Libraries that print through console handlers of their own, set up when nothing else logs yet.
LIBRARY_CONSOLES = ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric")

# (message pattern, why it says nothing to a user of this project). pyproject.toml filters the same
# for tests that run a Trainer without these commands.
KNOWN_WARNINGS = (
    # CLIP is frozen on purpose: its modules stay in eval mode while the prompt trains.
    r"Found .* module\(s\) in eval mode",
    # raised inside Lightning about its own use of torch's pytree API
    r".*isinstance\(treespec, LeafSpec\)",
    # on a machine with SLURM, runs outside a job are on purpose; hydra/launcher=slurm uses srun
    r"The `srun` command is available on your system but is not used",
    # a few-shot epoch is often shorter than the log interval; the loss is then logged every n
    # steps across epochs, which is the intent
    r"The number of training batches \(\d+\) is smaller than",
    # a method that validates nothing (method=clip_lora: its official code tests the last model)
    r"You passed in a `val_dataloader` but have no `validation_step`",
    # a resumed run writes its checkpoints into its own folder again, on purpose
    r"Checkpoint directory .* exists and is not empty",
)


class ProjectRecords(logging.Filter):
    """Passes the project's records and libraries' errors; libraries' info and warnings (open_clip's
    model-identifier parsing, Lightning's device lines and tips) stay in the log file, as the
    project logs what a user needs (device, precision, data, results) itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return (
            record.levelno >= logging.ERROR
            or record.name == PROJECT_MAIN
            or record.name.startswith(PROJECT_LOGGERS)
        )


def silence_known_warnings() -> None:
    for message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def console_logging() -> None:
    """The console of a command that Hydra does not set up (src.protocols), as
    conf/hydra/job_logging/quiet.yaml sets it up for the others: the project's lines and libraries'
    errors."""
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    console.addFilter(ProjectRecords())
    logging.basicConfig(level=logging.INFO, handlers=[console], force=True)
    for name in LIBRARY_CONSOLES:  # printed through handlers of their own: through the root instead
        library = logging.getLogger(name)
        library.handlers.clear()
        library.propagate = True

"""How a run behaves on a SLURM cluster."""

from __future__ import annotations

from lightning_fabric.plugins.environments import SLURMEnvironment


def lightning_plugins() -> list[SLURMEnvironment]:
    """Lightning's plugins for this process: under SLURM, its SLURM environment without auto-requeue.

    Jobs launched by `hydra/launcher=slurm` are requeued by submitit (on USR2, with the same output
    folder, where the run resumes from last.ckpt). Lightning's auto-requeue (on USR1, through an
    hpc_ckpt file that this project does not resume from) would be a second mechanism for the
    same thing, so it is off. Outside SLURM Lightning detects its environment as usual.
    """
    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []

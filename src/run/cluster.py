"""How a run behaves on a SLURM cluster, and what a refused submission means."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from lightning_fabric.plugins.environments import SLURMEnvironment


def lightning_plugins() -> list[SLURMEnvironment]:
    """Lightning's plugins for this process: under SLURM, its SLURM environment without auto-requeue.

    Jobs launched by `hydra/launcher=slurm` are requeued by submitit (on USR2, with the same output
    folder, where the run resumes from last.ckpt). Lightning's auto-requeue (on USR1, through an
    hpc_ckpt file that this project does not resume from) would be a second mechanism for the
    same thing, so it is off. Outside SLURM Lightning detects its environment as usual.
    """
    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


# sbatch's reasons for refusing a job (words of its error message, in this order) -> the option of
# conf/hydra/launcher/slurm.yaml that asked for what the cluster refuses, its sbatch flag, and a hint.
SBATCH_REFUSALS = (
    ("generic resource", "gpus_per_node", "--gpus-per-node", "null on a cluster without GPUs"),
    ("partition", "partition", "--partition", "`sinfo -s` lists them; null: the default partition"),
    ("memory", "mem_gb", "--mem", "at most a node's memory; null: the partition's default"),
    ("time limit", "timeout_min", "--time", "at most the partition's limit, `sinfo -o '%P %l'`"),
    ("account", "account", "--account", "one of yours, `sacctmgr show assoc user=$USER`"),
    ("qos", "qos", "--qos", "one of yours, `sacctmgr show assoc user=$USER`"),
    ("processors", "cpus_per_task", "--cpus-per-task", "at most a node's CPUs"),
    ("node count", "nodes", "--nodes", "at most the partition's nodes"),
)
# "Requested node configuration is not available": more of something than any node has.
NODE_OPTIONS = "gpus_per_node, cpus_per_task or mem_gb (`sinfo -o '%N %c %m %G'` shows what nodes have)"


def sbatch_refusal(refused: BaseException) -> str | None:
    """One line for a job that sbatch refused (submitit raises FailedJobError from sbatch's
    CalledProcessError, this one): sbatch's reason and the hydra.launcher option that changes it;
    None for any other error."""
    if not _is_sbatch_error(refused):
        return None
    stderr = refused.stderr.decode() if isinstance(refused.stderr, bytes) else refused.stderr or ""
    reasons = [line.split("error:", 1)[-1].strip() for line in stderr.splitlines() if line.strip()]
    reason = "; ".join(reasons) or f"exit status {refused.returncode}"
    asked = _sbatch_options(refused.cmd[-1])
    for words, option, flag, hint in SBATCH_REFUSALS:
        if words in reason.lower():
            given = f" ({flag}={asked[flag]})" if flag in asked else ""
            return f"sbatch refused the job{given}: {reason}; change hydra.launcher.{option} ({hint})"
    if "node configuration" in reason.lower():
        return f"sbatch refused the job: {reason}; change hydra.launcher.{NODE_OPTIONS}"
    return (
        f"sbatch refused the job: {reason}; change the hydra.launcher.* option that asks for it "
        "(conf/hydra/launcher/slurm.yaml; any other sbatch option: hydra.launcher.additional_parameters)"
    )


def _is_sbatch_error(err: BaseException) -> bool:  # narrows err to CalledProcessError
    if not isinstance(err, subprocess.CalledProcessError):
        return False
    command = [err.cmd] if isinstance(err.cmd, str) else list(err.cmd)
    return bool(command) and Path(str(command[0]).split()[0]).name == "sbatch"


def _sbatch_options(script: str) -> dict[str, str]:
    """The `#SBATCH --flag=value` lines of the submitted script (submitit leaves it after a refusal)."""
    try:
        text = Path(script).read_text()
    except OSError:
        return {}
    return dict(re.findall(r"^#SBATCH (--[\w-]+)=(\S+)", text, flags=re.MULTILINE))

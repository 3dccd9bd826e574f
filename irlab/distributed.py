"""DDP under Hydra: how extra ranks re-launch the *job* (not the command line), and per-job cleanup.

Lightning starts ranks 1..N-1 of a one-node DDP run by re-executing ``sys.argv`` with ``hydra.run.dir`` set.
That breaks sweeps: ``python train.py -m a=1,2 trainer=ddp`` would make every extra rank start a whole new
sweep, and its run folder would not be the job's folder. `hydra_child_command` instead re-runs the script
with the *job's* own overrides (``hydra.overrides.task``), in single-run mode, in the job's output folder.
`install_hydra_ddp_launch` swaps it into Lightning; `build_trainer` calls it, so every runner gets it.

On SLURM (``hydra/launcher=slurm``, one task per GPU) Lightning detects the SLURM environment and starts no
processes itself, so none of this is involved there.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

# overrides that only make sense for the launching process (sweeping, launching, its own run folder)
_LAUNCH_ONLY = ("hydra.mode", "hydra.sweep", "hydra/sweeper", "hydra.sweeper", "hydra/launcher", "hydra.launcher",
                "hydra.run", "hydra.output_subdir", "hydra.job.name", "hydra.callbacks")
_CONFIG_FLAGS = ("--config-path", "-cp", "--config-dir", "-cd")


def _config_location_args(argv: Sequence[str]) -> list[str]:
    """``--config-path``/``--config-dir`` flags of the original command line (with their values)."""
    out, args = [], list(argv)
    for i, arg in enumerate(args):
        if arg in _CONFIG_FLAGS and i + 1 < len(args):
            out += [arg, args[i + 1]]
        elif arg.startswith(tuple(f"{flag}=" for flag in _CONFIG_FLAGS)):
            out.append(arg)
    return out


def child_command(argv: Sequence[str], script: Sequence[str], config_name: str, task_overrides: Sequence[str],
                  hydra_overrides: Sequence[str], output_dir: str, local_rank: int) -> list[str]:
    """The command that starts `local_rank` of a Hydra job (pure function: everything passed in)."""
    hydra_kept = [o for o in hydra_overrides if not o.lstrip("~+").startswith(_LAUNCH_ONLY)]
    return [
        *script,
        *_config_location_args(argv[1:]),
        f"--config-name={config_name}",
        *task_overrides,
        *hydra_kept,
        f'hydra.run.dir="{output_dir}"',
        f"hydra.job.name=rank{local_rank}",
        "hydra.output_subdir=null",
    ]


def hydra_child_command(local_rank: int) -> tuple[list[str], str]:
    """Drop-in for Lightning's ``_hydra_subprocess_cmd``: (command, working directory)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    import __main__

    hc = HydraConfig.get()
    if __main__.__spec__ is None:
        script = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        script = [sys.executable, "-m", __main__.__spec__.name]
    command = child_command(sys.argv, script, hc.job.config_name, list(hc.overrides.task),
                            list(hc.overrides.hydra), hc.runtime.output_dir, local_rank)
    return command, get_original_cwd()


def install_hydra_ddp_launch() -> None:
    """Make Lightning's subprocess launcher use `hydra_child_command` (idempotent)."""
    from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
    from lightning.pytorch.strategies.launchers import subprocess_script as pytorch_launcher

    for module in (fabric_launcher, pytorch_launcher):
        module._hydra_subprocess_cmd = hydra_child_command


# set by Lightning's launcher in the launching process; a leftover LOCAL_RANK makes the next job of a sweep
# believe its processes were started externally (and wait forever for ranks that never come)
DDP_ENV_VARS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def ddp_env_snapshot() -> dict[str, str | None]:
    return {key: os.environ.get(key) for key in DDP_ENV_VARS}


def end_ddp_job(snapshot: dict[str, str | None]) -> None:
    """Leave the process as a job found it: process group destroyed, launcher environment variables restored."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key, value in snapshot.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value

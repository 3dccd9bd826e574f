"""Every command of the README's code blocks, as written, in a fresh folder with no path overrides.

Commands that train get ``debug=fast`` appended (a couple of batches). Commands that cannot run here are
skipped with the reason (a GPU, a dataset download, an optional extra, a placeholder path, the install and
test commands themselves), so a new README line is either run or explicitly explained.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.helpers import REPO

BENCHMARKS = re.compile(r"experiment=(cub|car|sop|isc)_")


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def skip_reason(command: str) -> str | None:
    if command.startswith("pip ") or "pytest" in command:
        return "the install / test command itself (CI runs it)"
    if re.search(r"trainer=(gpu|ddp)(\s|$)", command):
        return "needs a CUDA GPU"
    if BENCHMARKS.search(command):
        return "needs the benchmark's download"
    if "<" in command or "..." in command or "XXX" in command or "path/to" in command:
        return "placeholder path"
    if command.startswith("python serve.py"):
        return "a server runs until it is stopped (tests/test_serve.py runs one against a real client)"
    if "hydra/launcher=slurm" in command and importlib.util.find_spec("hydra_plugins") is None:
        return "the slurm extra is not installed"
    if "hparams_search=" in command:
        try:
            importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper")
        except ModuleNotFoundError:
            return "the optuna extra is not installed"
    return None


COMMANDS = readme_commands()


def test_readme_has_the_commands_this_test_is_about():
    assert "python train.py" in [c.split("&&")[-1].strip() for c in COMMANDS]
    assert any(c.startswith("python train.py -m") for c in COMMANDS)


@pytest.fixture(scope="module")
def fresh_folder(tmp_path_factory):
    """One fresh working folder for all commands, as a user's clone would be (the rendered data cache and the
    logs accumulate there, as they would for the user)."""
    return tmp_path_factory.mktemp("fresh_clone_cwd")


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs_as_written(command, fresh_folder):
    reason = skip_reason(command)
    if reason:
        pytest.skip(reason)
    argv = shlex.split(command)
    assert argv[0] == "python", command
    script = argv[1]
    args = argv[2:]
    if script == "-m":
        pytest.skip("module entry points are covered by their own tests")
    long_run = any(a.startswith("trainer.max_epochs=") for a in args)
    if long_run:  # its own epoch count outranks debug=fast: check that every key composes, do not train
        args.append("--cfg=job")
    elif "debug=fast" not in args:
        args.append("debug=fast")
    env = {k: v for k, v in os.environ.items() if not k.startswith("IRLAB_")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")
    proc = subprocess.run([sys.executable, str(REPO / script), *args], cwd=fresh_folder, capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
    if long_run:
        return
    assert "run folder:" in proc.stdout, proc.stdout[-2000:]
    if "-m" in args:
        check_sweep(fresh_folder, proc.stdout, args)


def check_sweep(folder, stdout: str, args: list[str]) -> None:
    """The multirun ends with a leaderboard: jobs differing only in seed averaged, with provenance."""
    sweep = max((folder / "logs" / "train" / "multiruns").iterdir(), key=lambda p: p.stat().st_mtime)
    rows = list(csv.DictReader((sweep / "leaderboard.csv").open()))
    swept = {a.split("=")[0]: len(a.split("=", 1)[1].split(",")) for a in args if "," in a and "=" in a}
    seeds = swept.pop("seed", 1)
    expected_rows = 1
    for values in swept.values():
        expected_rows *= values
    configurations = {r["row"].split(" / ")[0] for r in rows}  # IRGen adds " / rerank" and " / knn" rows
    assert len(configurations) == expected_rows, rows
    assert all(r["seeds"] == str(seeds) and r["status"] == "ok" for r in rows), rows
    assert all("seed" not in r["row"] for r in rows) and float(rows[0]["R@1_mean"]) >= 0
    assert (sweep / "leaderboard.png").is_file() and "leaderboard" in stdout
    provenance = json.loads((sweep / "0" / "metrics.json").read_text())["provenance"]
    assert provenance["seed"] == 1 and len(provenance["split_fingerprint"]) == 64
    assert provenance["metrics_version"] and "torch" in provenance["versions"] and "commit" in provenance["git"]

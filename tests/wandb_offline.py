"""Read an offline W&B run back with wandb's own reader (`wandb leet inspect`)."""

import json
import subprocess
import sys
from pathlib import Path


def _wandb(*args: str) -> str:
    exe = Path(sys.executable).with_name("wandb")
    return subprocess.run([str(exe), *args], check=True, capture_output=True, text=True).stdout


def run_summary(run_dir: str | Path) -> dict:
    """State, config and summary (latest values) of the run."""
    return json.loads(_wandb("leet", "inspect", "--summary", "--json", str(run_dir)))


def _records(run_dir: str | Path, kind: str) -> list[dict]:
    """The run's records of one type ("history", "stats", ...), each as {key: value}, in order."""
    rows = []
    for line in _wandb("leet", "inspect", "--json", str(run_dir)).splitlines():
        record = json.loads(line)
        if record.get("type") == kind:
            rows.append(record[kind]["item"])
    return rows


def run_history(run_dir: str | Path) -> list[dict]:
    """Every logged step as {key: value}, in order."""
    return _records(run_dir, "history")


def run_system_metrics(run_dir: str | Path) -> list[dict]:
    """W&B's own samples of the machine (CPU, memory, disk, GPU when there is one)."""
    return _records(run_dir, "stats")

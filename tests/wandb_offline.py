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


def run_history(run_dir: str | Path) -> list[dict]:
    """Every logged step as {key: value}, in order."""
    rows = []
    for line in _wandb("leet", "inspect", "--json", str(run_dir)).splitlines():
        record = json.loads(line)
        if record.get("type") == "history":
            rows.append(record["history"]["item"])
    return rows

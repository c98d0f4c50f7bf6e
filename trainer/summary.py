"""run.dir/summary.json: what a finished run produced (losses, checkpoint, metrics and W&B paths)."""

import json
import os
from pathlib import Path

SUMMARY_NAME = "summary.json"


def write_summary(run_dir: str, summary: dict) -> None:
    path = Path(run_dir) / SUMMARY_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, path)


def read_summary(run_dir: str) -> dict:
    path = Path(run_dir) / SUMMARY_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the run did not finish")
    return json.loads(path.read_text())

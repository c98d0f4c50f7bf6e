"""The small JSON files of runs and sweeps: run.dir/summary.json (what a finished run produced: losses,
checkpoint, metrics and W&B paths), run.dir/run_config.json (the config it trains with), a trial's
scheduler_stop.json, a sweep's config.json. Written whole,
so a reader never sees half a file; read with errors that name the file."""

import json
import os
from pathlib import Path

SUMMARY_NAME = "summary.json"
RUN_CONFIG_NAME = "run_config.json"


def write_json(path: str | Path, data: dict) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_json(path: str | Path) -> dict | None:
    """A JSON object file; None when there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def flat_config(cfg: dict, prefix: str = "") -> dict:
    """{"train.lr": 0.001, ...}: a stored config by dotted key, for telling two apart."""
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict) and value:
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def write_summary(run_dir: str | Path, summary: dict) -> None:
    write_json(Path(run_dir) / SUMMARY_NAME, summary)


def read_summary(run_dir: str | Path) -> dict:
    summary = read_json(Path(run_dir) / SUMMARY_NAME)
    if summary is None:
        raise FileNotFoundError(f"{Path(run_dir) / SUMMARY_NAME} not found: the run did not finish")
    return summary

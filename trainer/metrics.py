"""Per-step metrics from rank 0: appended to run.dir/metrics.jsonl and logged to W&B; the config
the run (its latest invocation) trains with, in run.dir/run_config.json, for `elmforge report`.

W&B is offline by default (files under run.dir/wandb, `wandb sync` uploads them);
the API key, when online, comes from the environment or `wandb login`, never
from the config. The run id derives from run.name and run.dir, so a re-run continues its run.
"""

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Optional

from trainer.errors import TrainingError
from trainer.summary import RUN_CONFIG_NAME, write_json


def wandb_run_id(run_name: str, run_dir: str) -> str:
    """Readable, and the same for every invocation of one run; with the run's directory in it, two runs
    of one config (one name) by two people, or under two storage paths, are two W&B runs, not one."""
    where = hashlib.sha256(os.path.abspath(run_dir).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '-', run_name)[:119]}-{where}"


def complete_lines(path: Path) -> list[str]:
    """metrics.jsonl's records, as lines; a last line without its newline, a write a kill or a full
    disk cut short, is left out."""
    lines = path.read_text(encoding="utf-8").split("\n") if path.is_file() else [""]
    return [line for line in lines[:-1] if line.strip()]  # the last item: "" after a final newline


def _wandb_init(wandb, **kwargs):
    """wandb.init, its refusals (no API key for an online run, no answer from the server) one line that names
    the ways out."""
    if kwargs["mode"] == "online":  # W&B waits up to its init_timeout (90 s) for the server, silently
        print("[wandb] connecting to the W&B server", flush=True)
    try:
        return wandb.init(**kwargs)
    except (wandb.errors.UsageError, wandb.errors.CommError) as e:
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
        instead = "set logger.mode=offline (upload later with wandb sync) or logger=none"
        status = re.search(r"returned error (\d{3})", str(e))  # the server answered, with this HTTP status
        if re.search(r"api.?key|log(ged)? ?in", str(e), re.IGNORECASE) or (status and status[1] in ("401", "403")):
            fix = f"log in (`wandb login`, or WANDB_API_KEY in the environment), or {instead}"
        elif status:
            fix = f"the W&B server answered HTTP {status[1]}: check WANDB_BASE_URL, or {instead}"
        elif isinstance(e, wandb.errors.CommError):  # the last line says why: refused, no route, DNS
            cause = f" ({lines[-1].removeprefix('while retrying: ')})" if len(lines) > 1 else ""
            lines[0] += cause
            fix = f"no answer from the W&B server: check this node's network (and WANDB_BASE_URL), or {instead}"
        else:
            fix = instead
        raise TrainingError(f"W&B (logger.mode={kwargs['mode']}): {lines[0]}: {fix}") from None


class MetricsLogger:
    def __init__(self, run_dir: str, cfg: dict, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb_dir: Optional[Path] = None
        self.last_validation: Optional[dict] = None  # {"step", "val_loss"} of the newest, kept records included
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._keep_until(resume_step)
        self._file = open(self.path, "a", buffering=1)
        write_json(self.path.with_name(RUN_CONFIG_NAME), cfg)
        log_cfg = cfg["logger"]
        if log_cfg["wandb"] and log_cfg["mode"] != "disabled":
            import wandb

            self._wandb = _wandb_init(
                wandb,
                project=log_cfg["project"],
                entity=log_cfg["entity"],
                group=log_cfg["group"],
                tags=list(log_cfg["tags"]),
                name=cfg["run"]["name"],
                id=wandb_run_id(cfg["run"]["name"], run_dir),
                resume="allow",
                dir=run_dir,
                mode=log_cfg["mode"],
                config=cfg,
                settings=wandb.Settings(console="off", quiet=True),
            )
            self.wandb_dir = Path(self._wandb.dir).parent
            url = self._wandb.get_url() if log_cfg["mode"] == "online" else None
            # A resumed run's earlier invocations wrote their own offline directories: upload them all.
            upload = " ".join(map(str, offline_runs(self.wandb_dir)))
            where = f"run {url}" if url else f"offline run {self.wandb_dir} (upload: wandb sync {upload})"
            print(f"[wandb] {where}", flush=True)

    def _keep_until(self, step: int) -> None:
        """On resume, drop records past the checkpoint: those steps are about to be trained again."""
        if not self.path.exists():
            return
        kept = [(line, record) for line in complete_lines(self.path) if (record := json.loads(line))["step"] <= step]
        rewritten = self.path.with_name(self.path.name + ".tmp")  # a kill meanwhile keeps the whole history
        rewritten.write_text("".join(line + "\n" for line, _ in kept))
        os.replace(rewritten, self.path)
        for _, record in kept:
            self._note_validation(record["step"], record)

    def _note_validation(self, step: int, record: dict) -> None:
        if "val_loss" in record:
            self.last_validation = {"step": step, "val_loss": record["val_loss"]}

    def log(self, step: int, record: dict) -> None:
        self._note_validation(step, record)
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": step, "time": time.time(), **record}) + "\n")
        if self._wandb is not None:
            self._wandb.log(record, step=step)

    def summary(self, values: dict) -> None:
        if self._wandb is not None:
            self._wandb.summary.update({k: v for k, v in values.items() if v is not None})

    def close(self, failed: bool = False) -> None:
        """`failed`: the run ends in an error, which the W&B run shows (its state, exit code 1)."""
        if not self.enabled:
            return
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish(exit_code=1 if failed else 0)


HEADER_ONLY_BYTES = 7


def holds_records(offline_dir: Path) -> bool:
    """Whether an offline W&B directory has anything to upload: an invocation killed before W&B wrote a
    record left its file's header alone (7 bytes), on which wandb sync stops with an error."""
    return any(f.stat().st_size > HEADER_ONLY_BYTES for f in offline_dir.glob("run-*.wandb"))


def offline_runs(wandb_dir: str | Path) -> list[Path]:
    """Every offline W&B directory of the run that wrote `wandb_dir`, oldest first: W&B cannot resume
    an offline run, so each invocation of a resumed run writes its own, under the same run id."""
    wandb_dir = Path(wandb_dir)
    # Named offline-run-<date>_<time>-<run id>[-N] (W&B adds -N to a second start within the same
    # second), each holding run-<run id>.wandb: the file, not the name, says which run a directory is.
    data_file = next(wandb_dir.glob("run-*.wandb")).name
    run_id = data_file.removeprefix("run-").removesuffix(".wandb")
    runs = [d for d in wandb_dir.parent.glob("offline-run-*")
            if (d / data_file).is_file() and (d == wandb_dir or holds_records(d))]  # this one: just started

    def start_order(d: Path) -> tuple[str, int]:
        stamp = d.name.split("-")[2]
        again = d.name.removeprefix(f"offline-run-{stamp}-{run_id}")  # "" or "-N"
        return stamp, int(again[1:] or 0)

    return sorted(runs, key=start_order)

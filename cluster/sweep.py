"""`elmforge sweep sweep=<name>`: hyperparameter search with Ray Tune over the training loop.

The search space is Hydra config (conf/sweep/*.yaml): `space` maps any config
key to choice / uniform / loguniform. Each trial is a Tune function trainable
that runs the usual TorchTrainer (Ray 2.60 cannot hand a trainer to Tune
directly) and forwards the loop's validation reports to Tune, where ASHA stops
weak trials early: it asks the trial's loop to stop (run.dir/STOP), so a
stopped trial ends with a checkpoint and summary.json like any run. Trials get
stable names and run dirs (named alike) under the sweep directory, so an
interrupted sweep resumes: Tune restores the experiment and each unfinished
trial resumes its training from its newest checkpoint.
"""

import csv
import json
import re
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from ray import tune
from ray.tune.error import TuneError
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from cluster.config import ConfigError
from cluster.launch import torch_trainer, worker_errors
from cluster.ray_runtime import connect, require_embedded_cpus
from cluster.report import METRICS_NAME, SCHEDULER_STOP_NAME, read_metrics, stopped_by_scheduler
from cluster.sweep_trial import as_the_schema_takes, apply, sweep_dir, trial_config
from trainer.preemption import clear_stop_request, request_stop
from trainer.errors import TrainingError, one_line
from trainer.metrics import holds_records
from trainer.summary import SUMMARY_NAME, flat_config, read_json, write_json
from trainer.train_loop import REPORTED_METRICS

CONFIG_NAME = "config.json"  # the config a sweep started with, beside tune/
# What a restored sweep may take from a new command line: where Ray runs, data preparation, and
# what each trial sets for itself. Tune restores everything else (the space, ASHA, the trials) as it was.
RESTORE_MAY_CHANGE = ("cluster.address", "cluster.num_cpus", "cluster.dashboard", "data.workers", "prepare.",
                      "submit.", "run.")

DISTRIBUTIONS = {
    "choice": lambda p: tune.choice(list(p["values"])),
    "uniform": lambda p: tune.uniform(p["low"], p["high"]),
    "loguniform": lambda p: tune.loguniform(p["low"], p["high"]),
}


def search_space(space: dict) -> dict:
    """Tune's space from the config's: {"train.lr": {"type": "loguniform", "low": .., "high": ..}, ...}."""
    return {key: _distribution(f"sweep.space.{key}", spec) for key, spec in space.items()}


def _distribution(where: str, spec):
    example = "e.g. 'sweep.space={train.lr:{type:loguniform,low:1e-4,high:1e-2}}' (keys are dotted)"
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind not in DISTRIBUTIONS:
        got = f".type={kind!r}" if isinstance(spec, dict) else f"={spec!r}"
        raise ConfigError(f"{where}{got}: expected a distribution of type {' / '.join(sorted(DISTRIBUTIONS))}, {example}")
    need = ("values",) if kind == "choice" else ("low", "high")
    missing = [k for k in need if k not in spec]
    if missing:
        raise ConfigError(f"{where}: {kind} needs {missing[0]!r}")
    if kind == "choice":
        if not isinstance(spec["values"], list) or not spec["values"]:
            raise ConfigError(f"{where}.values={spec['values']!r}: choice needs a non-empty list, e.g. values:[1,2]")
    else:
        low, high = spec["low"], spec["high"]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
        if not numbers or not low < high:
            raise ConfigError(f"{where}: {kind} needs numbers low < high, got low={low!r}, high={high!r}")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0, got low={low!r}")
    return DISTRIBUTIONS[kind](spec)


def check_space(cfg: dict) -> None:
    """Every key of sweep.space is a config key with a valid distribution, and every value a trial can draw
    (each choice, each bound of a range) gives a valid trial config: checked before Ray starts, where a trial
    would otherwise fail on its own, minutes in."""
    space = cfg["sweep"]["space"]
    if not space:
        raise ConfigError("sweep.space is empty: name the config keys to search, e.g. "
                          "'sweep.space={train.lr:{type:loguniform,low:1e-4,high:1e-2}}'")
    search_space(space)
    apply(cfg, dict.fromkeys(space), typed=False)
    for key, spec in space.items():
        if spec["type"] != "choice":  # draws fractional numbers
            try:
                as_the_schema_takes(key, float(spec["low"]))
            except ConfigError:
                raise ConfigError(f"sweep.space.{key}: {spec['type']} draws fractional numbers, and {key} takes "
                                  f"{type(as_the_schema_takes(key, spec['low'])).__name__} values: search it with "
                                  "choice (e.g. {type:choice,values:[2,4,8]})") from None
        for value in spec["values"] if spec["type"] == "choice" else (spec["low"], spec["high"]):
            try:
                trial = trial_config(cfg, {key: value}, "check")
                check_schedule(trial)  # a drawn train.max_steps may end trials before ASHA's first rung
                if cfg["cluster"]["address"] is None:  # one that could never start would keep the sweep waiting
                    require_embedded_cpus(trial["cluster"], cfg["sweep"]["trial_cpus"])
            except ConfigError as e:
                problems = str(e).removeprefix("invalid config:").strip().replace("\n  ", "; ")
                raise ConfigError(f"sweep.space.{key}: a trial with {key}={value} would fail: {problems}; "
                                  f"change the space (or the setting it conflicts with)") from None


def check_schedule(cfg: dict) -> None:
    """Trials are compared at validation steps and ASHA's first rung is grace_period: both within max_steps."""
    s, t = cfg["sweep"], cfg["train"]
    if s["mode"] not in ("min", "max"):
        raise ConfigError(f"sweep.mode={s['mode']!r}: expected min or max")
    if s["metric"] not in REPORTED_METRICS:
        raise ConfigError(f"sweep.metric={s['metric']!r}: not a metric the training loop reports at a validation "
                          f"({', '.join(REPORTED_METRICS)})")
    for key, least in (("num_samples", 1), ("max_concurrent_trials", 0), ("grace_period", 1), ("reduction_factor", 2)):
        if s[key] < least:  # ASHA and Tune assert these, after Ray has started
            raise ConfigError(f"sweep.{key}={s[key]}: must be at least {least}")
    if not s["trial_cpus"] > 0:
        raise ConfigError(f"sweep.trial_cpus={s['trial_cpus']}: must be positive (Ray needs a share of a CPU)")
    if not t["eval_every"]:
        raise ConfigError("a sweep compares trials on validation loss: set train.eval_every (e.g. in the sweep config)")
    for key, value in (("train.eval_every", t["eval_every"]), ("sweep.grace_period", s["grace_period"])):
        if value > t["max_steps"]:
            raise ConfigError(f"{key}={value} is above train.max_steps={t['max_steps']}: trials would end before "
                              f"{'their first validation' if key.startswith('train') else 'ASHA could compare them'}; "
                              f"lower {key} or raise train.max_steps")


def _trial(params: dict, base: dict) -> None:
    """One trial: the training loop on Ray Train workers, validation reports forwarded to Tune."""
    run_trial(trial_config(base, params, tune.get_context().get_trial_name()), callbacks=[TuneReportCallback()])


def run_trial(cfg: dict, callbacks: list | None = None) -> None:
    if stopped_early(Path(cfg["run"]["dir"])):  # a restored sweep does not train it past ASHA's decision
        return
    clear_stop_request(cfg["run"]["dir"])  # the trial launches its workers (a restored sweep re-asks ASHA's stops)
    torch_trainer(cfg, callbacks=callbacks).fit()


class StopByRequestASHA(ASHAScheduler):
    """ASHA that asks a trial to stop, where Tune would kill it.

    Tune stops a trial by ending its actor, which owns the trial's Ray Train controller and
    workers: a worker process then exits while its training thread is inside a torch operator, whose
    forced unwind calls std::terminate (a ~100-line SIGABRT dump on the console), and the trial leaves
    no checkpoint or summary.json. Here ASHA's
    decision is written to the trial's run dir (scheduler_stop.json, for results.csv and
    `elmforge report`) with a STOP file, and Tune is told to continue: the loop sees the file at the
    end of its current step, saves a checkpoint, writes summary.json and returns, and the trial
    completes. The request is asynchronous: results reported in the meantime are kept from ASHA.
    """

    def __init__(self, runs_root: str, max_steps: int, **asha):
        super().__init__(time_attr="step", max_t=max_steps, **asha)
        self.runs_root = runs_root
        self.max_steps = max_steps

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        run_dir = Path(self.runs_root, str(trial))
        record = run_dir / SCHEDULER_STOP_NAME
        if record.is_file():  # asked before; again, in case the trial restarted since (a restored sweep)
            _ask_to_stop(run_dir, read_json(record))
        elif super().on_trial_result(tune_controller, trial, result) == TrialScheduler.STOP:
            if result["step"] < self.max_steps:  # at the last step the trial ends anyway
                stop = {"scheduler": "ASHA", "step": result["step"], "metric": self.metric,
                        "value": result[self.metric]}
                write_json(record, stop)
                _ask_to_stop(run_dir, stop)
        return TrialScheduler.CONTINUE


def stopped_early(run_dir: Path) -> bool:
    """The trial stopped for the scheduler and saved (summary.json): done, though Tune may not have recorded
    it so before the sweep was interrupted (a trial ends seconds after its loop, once Ray Train has shut down)."""
    summary = read_json(run_dir / SUMMARY_NAME)
    return summary is not None and stopped_by_scheduler(run_dir, summary) is not None


def _ask_to_stop(run_dir: Path, stop: dict) -> None:
    request_stop(run_dir, f"stopped early by {stop['scheduler']} at step {stop['step']}")  # summary.json says so


def check_restorable(cfg: dict, out: Path) -> None:
    """A restored sweep runs as it started (Tune restores its space, ASHA and trials): an override
    that differs from the config it started with would be ignored, so it is refused, named."""
    started = read_json(out / CONFIG_NAME)
    if started is None:  # a sweep begun before this record was kept
        print(f"[sweep] {out / CONFIG_NAME} not found: overrides cannot be checked against the sweep's own",
              flush=True)
        return
    before, now, unset = flat_config(started), flat_config(json.loads(json.dumps(cfg))), "<unset>"
    searched = set(cfg["sweep"]["space"])  # each trial draws its own values of these
    changed = [k for k in sorted(before.keys() | now.keys()) if not k.startswith(RESTORE_MAY_CHANGE)
               and k not in searched and before.get(k, unset) != now.get(k, unset)]
    if changed:
        diffs = ", ".join(f"{k}={now.get(k, unset)!r} (it started with {before.get(k, unset)!r})" for k in changed)
        raise ConfigError(
            f"sweep {cfg['sweep']['name']} exists in {out} and resumes with the settings it started with, "
            f"so these would be ignored: {diffs}. To resume it, give it the values it started with "
            f"({' '.join(f'{k}={before.get(k, unset)}' for k in changed)}); to run with these, choose "
            f"another sweep.name (or delete {out})"
        )


@contextmanager
def _sigterm_as_ctrl_c():
    """Tune ends a sweep in order (trials stopped, its state saved for a resume) on Ctrl-C or SIGUSR1 only:
    SIGTERM (`elmforge jobs stop`, `ray job stop`, a node preempted) would kill it mid-step, leaving a
    worker group's placement group behind at times. While it lasts, SIGTERM is SIGUSR1, whose handler
    Tune always installs (its Ctrl-C one it may not, and puts back the shell's after one signal)."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGUSR1))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_sweep(cfg: dict, prepare_data: Callable[[], object] = lambda: None) -> list[dict]:
    """The sweep's config is checked first, then Ray starts, then `prepare_data` runs (on that Ray)."""
    s = cfg["sweep"]
    check_schedule(cfg)
    if cfg["cluster"]["address"] is None:  # a trial that could never start would keep the sweep waiting
        require_embedded_cpus(cfg["cluster"], s["trial_cpus"])
    check_space(cfg)  # each value a trial can draw too
    out = sweep_dir(cfg)
    experiment = out / "tune"
    restoring = resumable(out)
    if restoring:
        check_restorable(cfg, out)
    # Tune still ends a trial's actor, and with it its Ray Train controller, when the sweep is interrupted:
    # Ray Train frees that worker group's CPUs once its placement-group cleaner sees the controller gone,
    # which it asks the State API, which the dashboard serves. So this Ray, not one prepare would start.
    connect({**cfg["cluster"], "dashboard": True})
    prepare_data()
    trainable = tune.with_resources(tune.with_parameters(_trial, base=cfg), {"cpu": s["trial_cpus"]})
    if restoring:
        print(f"[sweep] resuming {experiment}", flush=True)
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, restart_errored=True)
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / CONFIG_NAME, cfg)
        tuner = _new_tuner(cfg, trainable, out)
    try:
        with _sigterm_as_ctrl_c():
            grid = tuner.fit()
    except TuneError as e:
        raise TrainingError(f"sweep {s['name']} failed: {one_line(e)}") from e
    # Tune marks the trials it ends on Ctrl-C (or SIGTERM) terminated too: a finished trial wrote its summary.
    finished = sum(bool(r.error) or (out / _trial_name(r) / SUMMARY_NAME).is_file() for r in grid)
    if finished < s["num_samples"]:  # Tune saved its state, for the same command to resume
        print(f"[sweep] {s['name']} interrupted with {finished} of {s['num_samples']} trials finished; re-run the "
              "same command to resume it", flush=True)
        raise KeyboardInterrupt
    rows = _table(grid, s, out)
    _write_csv(rows, out / "results.csv")
    _print_table(rows, s)
    print(f"[sweep] results: {out / 'results.csv'}\n[sweep] compare the trials: elmforge report {out}", flush=True)
    if cfg["logger"]["mode"] == "offline":
        print(f"[sweep] upload the trials' W&B runs: {upload_command(out)}", flush=True)
    return rows


def upload_command(out: Path) -> str:
    """wandb sync of every trial's offline runs, in start order (the shell sorts the glob so); listed one
    by one when a killed invocation left one with nothing to upload."""
    runs = sorted(out.glob("*/wandb/offline-run-*"))
    upload = [d for d in runs if holds_records(d)]
    which = f"{out}/*/wandb/offline-run-*" if len(upload) == len(runs) else " ".join(map(str, upload))
    return f"wandb sync {which}"


def resumable(out: Path) -> bool:
    """Whether the sweep in `out` resumes: Tune saved its state and a trial started. A sweep that stopped
    before its first trial (Ray could not start, say) holds nothing to resume: its state goes, so that
    the same command, corrected, starts it anew."""
    experiment = out / "tune"
    if not tune.Tuner.can_restore(str(experiment)):
        return False
    if _trial_dirs(out):
        return True
    print(f"[sweep] {out} holds no trial: starting it anew", flush=True)
    shutil.rmtree(experiment)
    return False


def _trial_name(result) -> str:
    return Path(result.path).name if result.path else "?"


def _trial_dirs(out: Path) -> list[Path]:
    """The run directories of the trials that started (each writes its metrics.jsonl)."""
    return [p.parent for p in out.glob("*/metrics.jsonl")]


def _new_tuner(cfg: dict, trainable, out: Path) -> tune.Tuner:
    s = cfg["sweep"]
    return tune.Tuner(
        trainable,
        param_space=search_space(s["space"]),
        tune_config=tune.TuneConfig(
            metric=s["metric"],
            mode=s["mode"],
            num_samples=s["num_samples"],
            scheduler=StopByRequestASHA(
                str(out), cfg["train"]["max_steps"], grace_period=s["grace_period"],
                reduction_factor=s["reduction_factor"],
            ),
            # Random search, seeded; it limits concurrency itself (TuneConfig's limit needs a Searcher).
            search_alg=BasicVariantGenerator(max_concurrent=s["max_concurrent_trials"], random_state=s["seed"]),
            trial_dirname_creator=str,  # Tune's own dir of a trial (under tune/) named as its run dir
        ),
        run_config=tune.RunConfig(name="tune", storage_path=str(out)),
    )


def _table(grid, s: dict, runs_root: Path) -> list[dict]:
    rows = []
    for result in grid:
        name = _trial_name(result)
        run = runs_root / name
        summary = read_json(run / SUMMARY_NAME)
        # The trial's own records: metrics.jsonl is cut back to the checkpoint a resumed trial went on from,
        # where Tune's history keeps the reports of every attempt.
        records = read_metrics(run / METRICS_NAME) if (run / METRICS_NAME).is_file() else []
        values = [r[s["metric"]] for r in records if r.get(s["metric"]) is not None]
        history = result.metrics_dataframe
        if not records and history is not None and s["metric"] in history:
            values = list(history[s["metric"]].dropna())
        best = (min(values) if s["mode"] == "min" else max(values)) if values else None  # none: failed before
        # where it ended (a stopped trial runs on to the step that sees the request), else its last record
        last_step = (summary["steps"] if summary else records[-1]["step"] if records
                     else (result.metrics or {}).get("step", 0))
        rows.append({
            "trial": name,
            **{k: result.config.get(k) for k in s["space"]},
            s["metric"]: None if best is None else float(best),
            "last_step": int(last_step),
            "stopped_early": stopped_by_scheduler(run, summary) is not None,
            "error": _error_line(result.error) if result.error else "",
        })
    key = s["metric"]
    return sorted(rows, key=lambda r: (r[key] is None, (r[key] or 0) * (1 if s["mode"] == "min" else -1)))


def _error_line(error: Exception) -> str:
    """The trial's own error (Tune's wraps it in a RayTaskError whose first line is Ray's, coloured, actor line)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", worker_errors(getattr(error, "cause", None) or error))


def _write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)


def _cell(value) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _print_table(rows: list[dict], s: dict) -> None:
    if not rows:
        print("[sweep] no trials ran")
        return
    cols = list(rows[0])
    cells = [[_cell(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(f"[sweep] {s['name']}: {len(rows)} trials, best first by {s['metric']} ({s['mode']})")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))

"""`elmforge sweep sweep=<name>`: hyperparameter search with Ray Tune over the training loop.

The search space is Hydra config (conf/sweep/*.yaml): `space` maps any config
key to choice / uniform / loguniform. Each trial is a Tune function trainable
that runs the usual TorchTrainer (Ray 2.60 cannot hand a trainer to Tune
directly) and forwards the loop's validation reports to Tune, where ASHA stops
weak trials early. Trials get stable names and run dirs under the sweep
directory, so an interrupted sweep resumes: Tune restores the experiment and
each unfinished trial resumes its training from its newest checkpoint.
"""

import copy
import csv
import os
from pathlib import Path

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from cluster.config import ConfigError, derive_batch, validate
from cluster.launch import torch_trainer
from cluster.ray_runtime import connect

DISTRIBUTIONS = {
    "choice": lambda p: tune.choice(list(p["values"])),
    "uniform": lambda p: tune.uniform(p["low"], p["high"]),
    "loguniform": lambda p: tune.loguniform(p["low"], p["high"]),
}


def search_space(space: dict) -> dict:
    """Tune's space from the config's: {"train.lr": {"type": "loguniform", "low": .., "high": ..}, ...}."""
    out = {}
    for key, spec in space.items():
        kind = spec.get("type")
        if kind not in DISTRIBUTIONS:
            raise ConfigError(f"sweep.space.{key}.type={kind!r}: expected one of {sorted(DISTRIBUTIONS)}")
        try:
            out[key] = DISTRIBUTIONS[kind](spec)
        except KeyError as e:
            raise ConfigError(f"sweep.space.{key}: {kind} needs {e.args[0]!r}") from None
    return out


def apply(cfg: dict, params: dict) -> dict:
    """A copy of cfg with dotted keys set; unknown keys are an error naming them."""
    cfg = copy.deepcopy(cfg)
    for dotted, value in params.items():
        parts = dotted.split(".")
        node = cfg
        for part in parts[:-1]:
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"sweep.space: {dotted} is not a config key")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"sweep.space: {dotted} is not a config key")
        node[parts[-1]] = value
    return cfg


def sweep_dir(cfg: dict) -> Path:
    return Path(cfg["storage_path"], "sweeps", cfg["sweep"]["name"])


def trial_config(cfg: dict, params: dict, trial_name: str) -> dict:
    trial = apply(cfg, params)
    trial["run"]["name"] = trial_name
    trial["run"]["dir"] = str(sweep_dir(cfg) / trial_name)
    trial["logger"]["group"] = cfg["sweep"]["name"]  # one W&B run per trial, grouped by the sweep
    if trial["train"]["global_batch_tokens"]:  # re-derived below, for the trial's own micro-batch
        trial["train"]["grad_accum_steps"] = None
    validate(trial)
    derive_batch(trial)
    return trial


def _trial(params: dict, base: dict) -> None:
    """One trial: the training loop on Ray Train workers, validation reports forwarded to Tune."""
    cfg = trial_config(base, params, tune.get_context().get_trial_name())
    torch_trainer(cfg, callbacks=[TuneReportCallback()]).fit()


def run_sweep(cfg: dict) -> list[dict]:
    s = cfg["sweep"]
    if not cfg["train"]["eval_every"]:
        raise ConfigError("a sweep compares trials on validation loss: set train.eval_every (e.g. in the sweep config)")
    # Ray Train frees the CPUs of a trial Tune stops early once its placement-group cleaner sees the
    # trial's controller gone, which it asks the State API, which the dashboard serves.
    connect({**cfg["cluster"], "dashboard": True})
    out = sweep_dir(cfg)
    trainable = tune.with_resources(tune.with_parameters(_trial, base=cfg), {"cpu": s["trial_cpus"]})
    experiment = out / "tune"
    if tune.Tuner.can_restore(str(experiment)):
        print(f"[sweep] resuming {experiment}", flush=True)
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, restart_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(s["space"]),
            tune_config=tune.TuneConfig(
                metric=s["metric"],
                mode=s["mode"],
                num_samples=s["num_samples"],
                scheduler=ASHAScheduler(
                    time_attr="step",
                    # Past the last step: a trial that reaches max_t is stopped (killed) at that
                    # report, before its final checkpoint is written; this way it finishes.
                    max_t=cfg["train"]["max_steps"] + 1,
                    grace_period=s["grace_period"],
                    reduction_factor=s["reduction_factor"],
                ),
                # Random search, seeded; it limits concurrency itself (TuneConfig's limit needs a Searcher).
                search_alg=BasicVariantGenerator(max_concurrent=s["max_concurrent_trials"], random_state=s["seed"]),
            ),
            run_config=tune.RunConfig(name="tune", storage_path=str(out)),
        )
    grid = tuner.fit()
    rows = _table(grid, s, cfg["train"]["max_steps"])
    _write_csv(rows, out / "results.csv")
    _print_table(rows, s)
    print(f"[sweep] results: {out / 'results.csv'}\n[sweep] compare the trials: elmforge report {out}", flush=True)
    return rows


def _table(grid, s: dict, max_steps: int) -> list[dict]:
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        history = result.metrics_dataframe
        best = None  # a trial that failed before its first validation has no history
        if history is not None and s["metric"] in history:
            best = float(history[s["metric"]].min() if s["mode"] == "min" else history[s["metric"]].max())
        step = int(metrics.get("step", 0))
        rows.append({
            "trial": Path(result.path).name.split("_", 1)[-1] if result.path else "?",
            **{k: result.config.get(k) for k in s["space"]},
            s["metric"]: best,
            "last_step": step,
            "stopped_early": step < max_steps and result.error is None,
            "error": str(result.error).splitlines()[0] if result.error else "",
        })
    key = s["metric"]
    return sorted(rows, key=lambda r: (r[key] is None, (r[key] or 0) * (1 if s["mode"] == "min" else -1)))


def _write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)


def _print_table(rows: list[dict], s: dict) -> None:
    if not rows:
        print("[sweep] no trials ran")
        return
    cols = list(rows[0])
    cells = [[("" if r[c] is None else f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c])) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(f"[sweep] {s['name']}: {len(rows)} trials, best first by {s['metric']} ({s['mode']})")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))

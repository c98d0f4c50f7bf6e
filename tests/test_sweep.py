"""A 4-trial sweep on the tiny model under Ray Tune: completes, ASHA stops weak trials early."""

import csv
import json
import os
import threading
import time
from pathlib import Path

import pytest

from cluster.cli import main
from cluster.sweep import search_space
from cluster.sweep_trial import apply
from cluster.config import ConfigError, compose_config
from corpus import make_documents, write_jsonl
from test_train_loop import SMALL_MODEL


def test_the_search_space_is_read_from_config():
    space = search_space(compose_config(["sweep=lr_tiny"])["sweep"]["space"])
    assert set(space) == {"train.lr", "train.warmup_steps"}
    with pytest.raises(ConfigError, match=r"sweep.space.train.lr.type='gauss'"):
        search_space({"train.lr": {"type": "gauss"}})
    with pytest.raises(ConfigError, match=r"sweep.space.train.lr: loguniform needs 'high'"):
        search_space({"train.lr": {"type": "loguniform", "low": 1e-4}})
    for space, message in [
        ({"train.lr": 0.01}, r"sweep.space.train.lr=0.01: expected a distribution of type choice / loguniform"),
        ({"train": {"lr": {"type": "uniform"}}}, r"sweep.space.train.type=None: .*\(keys are dotted\)"),
        ({"train.lr": {"type": "loguniform", "low": 0, "high": 0.1}}, r"loguniform needs low > 0, got low=0"),
        ({"train.lr": {"type": "uniform", "low": 0.1, "high": 0.01}}, r"uniform needs numbers low < high"),
        ({"train.warmup_steps": {"type": "choice", "values": []}}, r"values=\[\]: choice needs a non-empty list"),
        ({"train.warmup_steps": {"type": "choice", "values": 5}}, r"values=5: choice needs a non-empty list"),
    ]:
        with pytest.raises(ConfigError, match=message):
            search_space(space)


def test_trial_parameters_must_be_config_keys():
    cfg = compose_config([])
    assert apply(cfg, {"train.lr": 0.5})["train"]["lr"] == 0.5 and cfg["train"]["lr"] != 0.5
    with pytest.raises(ConfigError, match="train.lrr is not a config key"):
        apply(cfg, {"train.lrr": 0.5})
    with pytest.raises(ConfigError, match="train.lr.low is not a config key"):
        apply(cfg, {"train.lr.low": 0.5})
    with pytest.raises(ConfigError, match=r"model is a section, not a value; search its keys \(model.<key>\)"):
        apply(cfg, {"model": "openelm_270m"})


def test_a_command_line_space_replaces_the_files_and_its_keys_are_checked(tmp_path, capsys):
    space = "sweep.space={train.weight_decay:{type:uniform,low:0.0,high:0.2}}"
    assert compose_config(["sweep=lr_tiny", space])["sweep"]["space"] == {
        "train.weight_decay": {"type": "uniform", "low": 0.0, "high": 0.2}}
    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_documents(50, seed=1))
    overrides = [*SMALL_MODEL, f"storage_path={tmp_path}", f"data.sources=[{{name:gen,path:{corpus}}}]",
                 "data.workers=0", "sweep=lr_tiny"]
    assert main(["sweep", *overrides, "sweep.space={train.lrr:{type:uniform,low:0.0,high:0.2}}"]) == 2
    assert "elmforge sweep: config error\nsweep.space: train.lrr is not a config key" in capsys.readouterr().err
    assert main(["sweep", *overrides, "sweep.space={}"]) == 2
    assert "sweep.space is empty" in capsys.readouterr().err
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "data").exists()  # before Ray and the data


@pytest.mark.parametrize("extra, message", [
    (["train.max_steps=8", "train.warmup_steps=2"],
     "train.eval_every=10 is above train.max_steps=8: trials would end before their first validation"),
    (["train.max_steps=8", "train.warmup_steps=2", "train.eval_every=4"],
     "sweep.grace_period=10 is above train.max_steps=8: trials would end before ASHA could compare them"),
    (["train.max_steps=8", "train.warmup_steps=2", "train.eval_every=4", "sweep.grace_period=4"],  # lr_tiny's 10
     "sweep.space.train.warmup_steps: a trial with train.warmup_steps=10 would fail: train.warmup_steps=10: must be"),
    (["sweep.metric=val_los"], "sweep.metric='val_los': not a metric the training loop reports at a validation"),
    (["sweep.mode=maximize"], "sweep.mode='maximize': expected min or max"),
    (["sweep.reduction_factor=1"], "sweep.reduction_factor=1: must be at least 2"),  # ASHA's assertion, once
    (["sweep.grace_period=0"], "sweep.grace_period=0: must be at least 1"),  # Ray had started
    (["sweep.max_concurrent_trials=-1"], "sweep.max_concurrent_trials=-1: must be at least 0"),  # 0: no limit
    (["sweep.space={train.lr:{type:uniform,low:-1.0,high:0.1}}"],  # the base is checked at the low bound
     "invalid config, with searched keys at values sweep.space draws (train.lr=-1.0):\n  train.lr=-1.0: must "
     "be a positive number"),
    (["sweep.space={train.lr:{type:uniform,low:0.1,high:0.2},train.warmup_steps:{type:choice,values:[5,1000]}}",
      "train.lr=-1.0"],  # a base value every trial replaces is no error; a drawn one is
     "sweep.space.train.warmup_steps: a trial with train.warmup_steps=1000 would fail: train.warmup_steps=1000: must"),
    # Drawn values go through the schema's types, as command-line values do.
    (["sweep.space={train.precision:{type:choice,values:[fp32,fp8]}}"],
     "sweep.space.train.precision: a trial with train.precision=fp8 would fail: train.precision='fp8': Invalid value "
     "'fp8', expected one of [fp32, bf16]"),
    (["sweep.space={train.max_steps:{type:choice,values:[40,8]}}", "train.warmup_steps=2"],  # checked at 40, then 8
     "sweep.space.train.max_steps: a trial with train.max_steps=8 would fail: train.eval_every=10 is above "
     "train.max_steps=8"),
    (["sweep.space={train.warmup_steps:{type:uniform,low:2,high:8}}"],
     "sweep.space.train.warmup_steps: uniform draws fractional numbers, and train.warmup_steps takes int values: "
     "search it with choice"),
    (["sweep.space={model.num_layers:{type:choice,values:[4,0]}}"],
     "sweep.space.model.num_layers: a trial with model.num_layers=0 would fail: model.num_layers=0: must be at least 1"),
])
def test_a_sweep_whose_trials_could_not_run_is_refused_before_ray_starts(tmp_path, capsys, extra, message):
    assert main(["sweep", "sweep=lr_tiny", f"storage_path={tmp_path}", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "data").exists()


def test_a_trial_the_embedded_ray_cannot_hold_is_refused_before_ray_starts(tmp_path, capsys):
    assert main(["sweep", "sweep=lr_tiny", f"storage_path={tmp_path}", "cluster.num_workers=4"]) == 2
    assert ("elmforge sweep: config error\ncluster.num_workers=4 workers of cluster.cpus_per_worker=1 plus sweep.trial_cpus=0.1 for "
            "the trial need 4.1 CPUs, more than the embedded Ray's cluster.num_cpus=4") in capsys.readouterr().err
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "data").exists()
    # So is one a trial could draw.
    space = "sweep.space={cluster.num_workers:{type:choice,values:[1,8]}}"
    assert main(["sweep", "sweep=lr_tiny", f"storage_path={tmp_path}", space]) == 2
    assert ("sweep.space.cluster.num_workers: a trial with cluster.num_workers=8 would fail: cluster.num_workers=8 "
            "workers of cluster.cpus_per_worker=1 plus sweep.trial_cpus=0.1 for the trial need 8.1 CPUs") \
        in capsys.readouterr().err
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "data").exists()


def test_a_searched_key_is_checked_at_the_values_trials_draw_not_at_the_base(tmp_path, capsys):
    from cluster.sweep import check_restorable, check_schedule, check_space
    from cluster.sweep_trial import compose_sweep_base
    from trainer.summary import write_json

    # Every trial replaces train.max_steps: the base's 20, below its warmup of 40, is no error.
    base = ["sweep=lr_tiny", f"storage_path={tmp_path}", "train.max_steps=20", "train.warmup_steps=40",
            "sweep.space={train.max_steps:{type:choice,values:[60,80]}}"]
    with pytest.raises(ConfigError, match="train.warmup_steps=40: must be in"):
        compose_config(base)  # as any other verb checks it
    cfg = compose_sweep_base(base)
    assert cfg["train"]["max_steps"] == 60
    check_schedule(cfg)
    check_space(cfg)
    assert main(["sweep", *base, "--cfg", "job"]) == 0
    assert "  max_steps: 60\n" in capsys.readouterr().out
    # A value the space draws is still checked, against the rest of the config.
    short = [*base[:-1], "sweep.space={train.max_steps:{type:choice,values:[60,30]}}"]
    with pytest.raises(ConfigError, match="a trial with train.max_steps=30 would fail: train.warmup_steps=40"):
        check_space(compose_sweep_base(short))
    # A restored sweep does not compare what trials draw with what it started with; other keys it does.
    write_json(tmp_path / "config.json", {**cfg, "train": {**cfg["train"], "max_steps": 20}})
    check_restorable(cfg, tmp_path)
    write_json(tmp_path / "config.json", {**cfg, "train": {**cfg["train"], "eval_every": 5}})
    with pytest.raises(ConfigError, match=r"train.eval_every=10 \(it started with 5\)"):
        check_restorable(cfg, tmp_path)


def test_a_trial_asha_stopped_is_not_trained_again_by_a_restored_sweep(tmp_path):
    import ray

    from cluster.report import SCHEDULER_STOP_NAME
    from cluster.sweep import run_trial, stopped_early
    from cluster.sweep_trial import trial_config
    from trainer.summary import write_json, write_summary

    # ASHA's decision recorded, and the stop it asked for saved: done, even if Tune had not recorded it so.
    write_json(tmp_path / SCHEDULER_STOP_NAME, {"scheduler": "ASHA", "step": 10, "metric": "val_loss", "value": 5.0})
    assert not stopped_early(tmp_path)  # asked, not yet stopped: the restored trial goes on to its stop
    write_summary(tmp_path, {"steps": 12, "stopped_by": "stopped early by ASHA at step 10"})
    assert stopped_early(tmp_path)
    base = compose_config(["sweep=lr_tiny", f"storage_path={tmp_path}", f"data.dir={tmp_path / 'no_data'}"])
    trial = {**trial_config(base, {}, "t"), "run": {"name": "t", "dir": str(tmp_path)}}
    # It returns at once: no worker group for a trial that is done. Were it trained, Ray Train would wait
    # for this data-less trial's workers for minutes: a thread bounds the wait so the test fails instead.
    returned = []
    check = threading.Thread(target=lambda: returned.append(run_trial(trial)), daemon=True)
    check.start()
    check.join(timeout=60)
    assert returned == [None] and not ray.is_initialized()
    write_summary(tmp_path, {"steps": 40, "stopped_by": None})  # it reached its last step before the request
    assert not stopped_early(tmp_path)


TWO_TRIALS_REPORT = """
import sys
import time

import cluster.cli  # what `elmforge` imports first
import ray
from cluster.ray_runtime import connect


class Tee:  # what Ray forwards from the workers, seen here as it is printed
    def __init__(self, out):
        self.out, self.text = out, ""

    def write(self, text):
        self.text += text
        return self.out.write(text)

    def flush(self):
        self.out.flush()


connect({"address": None, "num_cpus": 2, "dashboard": False, "use_gpu": False})
sys.stdout = Tee(sys.stdout)


@ray.remote(num_cpus=0)
class Trial:
    def ready(self):
        return True

    def report(self, i):
        for step in (1, 2):
            print(f"[train] step {step}/2 | loss {i + step / 10:.4f}", flush=True)


trials = [Trial.remote() for _ in range(2)]
ray.get([t.ready.remote() for t in trials])
ray.get([t.report.remote(i) for i, t in enumerate(trials)])  # both at once, as a sweep's trials do
expected = [f"[train] step {step}/2 | loss {i + step / 10:.4f}" for i in (0, 1) for step in (1, 2)]
deadline = time.monotonic() + 60  # Ray forwards worker lines asynchronously: wait for them, or give up
while not all(line in sys.stdout.text for line in expected) and time.monotonic() < deadline:
    time.sleep(0.2)
ray.shutdown()
"""


@pytest.mark.integration
def test_every_trials_progress_lines_are_shown(tmp_path):
    # Ray folds lines from several processes that differ only in numbers into one "[repeated 2x ...]".
    import subprocess
    import sys

    from test_submit import REPO

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_DEDUP")}
    done = subprocess.run([sys.executable, "-c", TWO_TRIALS_REPORT], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line.split(") ", 1)[-1] for line in done.stdout.splitlines()]
    for i in (0, 1):
        for step in (1, 2):
            assert f"[train] step {step}/2 | loss {i + step / 10:.4f}" in lines, done.stdout
    assert "repeated" not in done.stdout


# ASHA's stop request reaches a trial one or two validation reports after the one it judged (each
# report waits on Ray Train, about a second here): a trial judged at the first rung (step 2) has ten
# more before it would end on its own and so cannot finish before the request lands.
SWEEP_STEPS = 24


@pytest.mark.integration
def test_a_four_trial_sweep_completes_and_asha_stops_some_early(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_documents(400, seed=5))
    overrides = [
        *SMALL_MODEL, f"storage_path={tmp_path}", f"data.sources=[{{name:gen,path:{corpus}}}]", "data.workers=0",
        "data.val_fraction=0.2", "sweep=lr_tiny",
        "sweep.space={train.lr:{type:loguniform,low:1e-5,high:0.1},train.warmup_steps:{type:choice,values:[1,2]}}",
        "sweep.grace_period=2", "sweep.num_samples=4", "sweep.max_concurrent_trials=1",
        f"train.max_steps={SWEEP_STEPS}",
        "train.eval_every=2", "train.eval_batches=2", "train.warmup_steps=1",
        "train.micro_batch_size=4", "train.loader_workers=0", "cluster.num_workers=1", "logger.mode=offline",
    ]
    import ray

    try:
        assert main(["sweep", *overrides]) == 0
        # Every trial's worker group must give its CPUs back (Ray Train's cleaner checks each second).
        deadline = time.monotonic() + 30
        while ray.available_resources().get("CPU") != ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
            time.sleep(1)
        assert ray.available_resources().get("CPU") == ray.cluster_resources()["CPU"]
    finally:
        ray.shutdown()  # a failure here must not leave this Ray to the next tests
    out = capsys.readouterr().out
    assert "[sweep] lr_tiny: 4 trials" in out
    assert f"[sweep] upload the trials' W&B runs: wandb sync {tmp_path}/sweeps/lr_tiny/*/wandb/offline-run-*" in out
    rows = list(csv.DictReader(open(tmp_path / "sweeps/lr_tiny/results.csv")))
    assert len(rows) == 4 and all(r["error"] == "" for r in rows)
    losses = [float(r["val_loss"]) for r in rows]
    assert losses == sorted(losses)
    assert any(int(r["last_step"]) == SWEEP_STEPS for r in rows)
    sweep = tmp_path / "sweeps/lr_tiny"
    trial_dirs = {p.name: p for p in sweep.iterdir() if (p / "metrics.jsonl").exists()}
    assert set(trial_dirs) == {r["trial"] for r in rows}  # the table names each trial by its directory
    # ASHA stopped some trials, and each ended in order: asked to stop, it saved its step and wrote its summary.
    assert sum((d / "scheduler_stop.json").is_file() for d in trial_dirs.values()) >= 1
    assert any(r["stopped_early"] == "True" for r in rows)
    for row in rows:
        trial_dir = trial_dirs[row["trial"]]
        summary = json.loads((trial_dir / "summary.json").read_text())
        step = summary["steps"]
        last_logged = json.loads((trial_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
        assert int(row["last_step"]) == step == last_logged
        assert (trial_dir / f"checkpoints/step_{step}/COMPLETE").is_file()
        stopped = bool(summary.get("stopped_by") or summary.get("preempted"))
        assert (row["stopped_early"] == "True") == stopped and (stopped or step == SWEEP_STEPS)
        if stopped:
            decision = json.loads((trial_dir / "scheduler_stop.json").read_text())
            assert decision["scheduler"] == "ASHA" and 2 <= decision["step"] <= step
            assert summary["stopped_by"] == f"stopped early by ASHA at step {decision['step']}"
    from cluster.report import build_report
    from test_report import parse_page

    page = parse_page(build_report([str(sweep)], str(tmp_path / "report"))["html"])
    assert set(page.rows) == set(trial_dirs)
    assert {name for name, r in page.rows.items() if r["status"].startswith("stopped early by ASHA at step ")} == {
        r["trial"] for r in rows if r["stopped_early"] == "True"}
    for r in rows:  # the report tells the trials apart by the values the sweep chose (run_config.json)
        assert f"train.lr={r['train.lr']}" in page.rows[r["trial"]]["settings"], page.rows[r["trial"]]
    wandb_runs = list(sweep.glob("*/wandb/offline-run-*"))
    assert len(wandb_runs) == 4
    from wandb_offline import run_summary

    assert all(run_summary(p)["config"]["logger"]["group"] == "lr_tiny" for p in wandb_runs)


def test_a_sweep_resumes_only_once_a_trial_started(tmp_path, capsys):
    from ray import tune

    from cluster.sweep import resumable

    experiment = tmp_path / "tune"
    experiment.mkdir()
    (experiment / "tuner.pkl").write_bytes(b"")  # what Tune writes as the sweep starts, what it restores from
    assert tune.Tuner.can_restore(str(experiment))
    assert not resumable(tmp_path) and not experiment.exists()  # stopped before its first trial: starts anew
    assert f"[sweep] {tmp_path} holds no trial: starting it anew" in capsys.readouterr().out
    experiment.mkdir()
    (experiment / "tuner.pkl").write_bytes(b"")
    (tmp_path / "_trial_a_00000").mkdir()
    (tmp_path / "_trial_a_00000/metrics.jsonl").write_text("")
    assert resumable(tmp_path) and experiment.exists()
    assert not resumable(tmp_path / "new")


def test_a_trial_that_failed_before_reporting_is_listed_with_its_error(tmp_path):
    from types import SimpleNamespace

    import pandas as pd
    from ray.exceptions import RayTaskError

    from cluster.sweep import _table

    s = {"metric": "val_loss", "mode": "min", "space": {"train.lr": {}}}
    ok = SimpleNamespace(metrics={"step": 8}, metrics_dataframe=pd.DataFrame({"val_loss": [3.0, 2.5]}),
                         path="/x/_trial_1", config={"train.lr": 0.1}, error=None)
    failed = SimpleNamespace(metrics={}, metrics_dataframe=pd.DataFrame(), path="/x/_trial_2",
                             config={"train.lr": 0.2}, error=RuntimeError("worker group did not start\nmore"))
    rows = _table([failed, ok], s, tmp_path)
    assert [r["val_loss"] for r in rows] == [2.5, None] and [r["trial"] for r in rows] == ["_trial_1", "_trial_2"]
    assert rows[1]["error"] == "worker group did not start" and not rows[1]["stopped_early"]
    # Tune's error wraps the trial's own in Ray's: its first line is Ray's coloured actor line.
    wrapped = RayTaskError("ImplicitFunc.train", "Traceback ...", ValueError("loss is NaN\nmore"),
                           proctitle="ray::ImplicitFunc.train()", pid=5, ip="10.0.0.1")
    assert _table([SimpleNamespace(**{**vars(failed), "error": wrapped})], s, tmp_path)[0]["error"] == "loss is NaN"


def test_a_resumed_trial_is_ranked_on_its_own_records_not_on_a_discarded_attempts(tmp_path):
    from types import SimpleNamespace

    import pandas as pd

    from cluster.sweep import _table

    # Tune kept the first attempt's reports (steps 10, 20, 30), then the resumed one's (10, 20): the run's
    # metrics.jsonl was cut back to its checkpoint and holds only what the run as it ended reported.
    (tmp_path / "_trial_1").mkdir()
    (tmp_path / "_trial_1/metrics.jsonl").write_text(
        "".join(json.dumps({"step": k, "loss": 6.0, **({"val_loss": v} if v else {})}) + "\n"
                for k, v in ((10, 6.1), (20, 5.9), (22, None))))
    trial = SimpleNamespace(metrics={"step": 20}, metrics_dataframe=pd.DataFrame({"val_loss": [6.1, 5.9, 5.7, 6.1, 5.9]}),
                            path="/x/_trial_1", config={"train.lr": 0.1}, error=None)
    [row] = _table([trial], {"metric": "val_loss", "mode": "min", "space": {"train.lr": {}}}, tmp_path)
    assert row["val_loss"] == 5.9 and row["last_step"] == 22


@pytest.mark.integration
def test_an_interrupted_sweep_resumes_where_it_stopped(tmp_path):
    import signal
    import subprocess
    import sys

    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_documents(300, seed=6))
    cmd = [
        sys.executable, "-m", "cluster.cli", "sweep", *SMALL_MODEL, f"storage_path={tmp_path}",
        f"data.sources=[{{name:gen,path:{corpus}}}]", "data.workers=0", "data.val_fraction=0.2", "sweep=lr_tiny",
        "sweep.space={train.lr:{type:loguniform,low:1e-4,high:1e-2},train.warmup_steps:{type:choice,values:[1,2]}}",
        "sweep.num_samples=2", "sweep.max_concurrent_trials=1", "sweep.grace_period=6", "train.max_steps=6",
        "train.eval_every=3", "train.eval_batches=1", "train.warmup_steps=1", "train.micro_batch_size=4",
        "train.loader_workers=0", "cluster.num_workers=1", "logger=none",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    seen = []
    # Once the first trial has finished: SIGTERM (as `jobs stop` sends it), which ends a sweep as Ctrl-C does.
    # The second trial's worker group takes seconds to start: on a busy machine a signal sent when it had
    # started could reach Tune only after its six steps.
    for line in proc.stdout:
        seen.append(line)
        if "_00000 completed" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=300)
    first_out = "".join(seen) + rest
    assert "_00000 completed" in first_out, first_out[-3000:]
    # Interrupted, not finished: no results table, and a status that says so.
    assert proc.returncode == 130 and "[sweep] lr_tiny interrupted with 1 of 2 trials finished; re-run" in first_out
    assert not (tmp_path / "sweeps/lr_tiny/results.csv").exists()

    # A restored sweep keeps the settings it started with: an override that differs is refused, named.
    changed = subprocess.run([*cmd, "sweep.num_samples=6", "train.max_steps=8"], capture_output=True, text=True,
                             timeout=300, cwd=tmp_path)
    assert changed.returncode == 2, changed.stdout[-3000:] + changed.stderr[-3000:]
    assert "sweep.num_samples=6 (it started with 2), train.max_steps=8 (it started with 6)" in changed.stderr
    assert "choose another sweep.name" in changed.stderr and "[sweep] resuming" not in changed.stdout
    assert "To resume it, give it the values it started with (sweep.num_samples=2 train.max_steps=6)" in changed.stderr

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-3000:]
    assert "[sweep] resuming" in out and "[sweep] lr_tiny: 2 trials" in out
    assert "_00000 started" not in out  # the finished trial is not run again
    rows = list(csv.DictReader(open(tmp_path / "sweeps/lr_tiny/results.csv")))
    assert len(rows) == 2 and all(r["error"] == "" and int(r["last_step"]) == 6 for r in rows)
    first_trial = next((tmp_path / "sweeps/lr_tiny").glob("*_00000"))
    assert [json.loads(x)["step"] for x in open(first_trial / "metrics.jsonl")] == list(range(1, 7))

def test_a_sweeps_upload_command_leaves_out_a_killed_invocations_empty_run(tmp_path):
    from cluster.sweep import upload_command

    def offline_dir(trial: str, name: str, size: int) -> Path:
        d = tmp_path / trial / "wandb" / f"offline-run-{name}"
        d.mkdir(parents=True)
        (d / f"run-{trial}.wandb").write_bytes(b"\0" * size)
        return d

    offline_dir("t1", "20261128_063119-t1", 4096)
    offline_dir("t2", "20261128_063120-t2", 4096)
    assert upload_command(tmp_path) == f"wandb sync {tmp_path}/*/wandb/offline-run-*"
    offline_dir("t2", "20261128_063150-t2", 7)  # killed before W&B wrote a record; restarted below
    offline_dir("t2", "20261128_063155-t2", 4096)
    assert upload_command(tmp_path) == (f"wandb sync {tmp_path}/t1/wandb/offline-run-20261128_063119-t1 "
                                        f"{tmp_path}/t2/wandb/offline-run-20261128_063120-t2 "
                                        f"{tmp_path}/t2/wandb/offline-run-20261128_063155-t2")

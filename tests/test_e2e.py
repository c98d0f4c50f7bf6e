"""`elmforge train` end to end: prepare, embedded Ray, 2 Ray Train workers, DeepSpeed ZeRO-2, W&B offline."""

import json
import math
import subprocess
import sys

import pytest
import requests

from cluster.submit import auth_token
from trainer.summary import read_summary
from wandb_offline import run_summary

pytestmark = pytest.mark.integration


def test_elmforge_train_demo_end_to_end(tmp_path):
    cmd = [sys.executable, "-m", "cluster.cli", "train", f"storage_path={tmp_path}", "train.max_steps=12",
           "train.warmup_steps=3", "train.log_every=1", "run.name=e2e"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "2 ranks, ZeRO-2, fp32, 12 steps" in out
    assert "; 1 CPU thread per rank" in out  # cluster.cpus_per_worker=1, not every core of the machine

    run_dir = tmp_path / "outputs" / "e2e"
    summary = read_summary(run_dir)
    losses = summary["losses"]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    for key in ("shards", "checkpoint", "metrics", "W&B run"):
        assert key in proc.stdout, key
    # At start: where to watch the run.
    assert "[ray] embedded instance without a dashboard" in out and "[wandb] offline run" in out and "wandb sync" in out
    # The cleaner's State API warnings (one a second without a dashboard), or the controller's when the
    # cleaner gave up first; Ray's notice that an instance it starts uses token authentication.
    assert "PlacementGroupCleaner" not in out and "Token authentication is enabled" not in out
    # Worker lines come through the driver with Ray's prefix, and without colour codes in a pipe.
    assert "(RayTrainWorker pid=" in out and "\x1b[" not in out

    # Both ranks wrote their ZeRO-2 optimizer partition; rank 0 marked it complete.
    ckpt = run_dir / "checkpoints" / "step_12"
    assert (ckpt / "COMPLETE").is_file()
    assert len(list(ckpt.glob("*zero_pp_rank_*_optim_states.pt"))) == 2

    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["loss"] for r in records] == losses

    wb = run_summary(summary["wandb_dir"])
    assert wb["state"] == "finished" and wb["summary"]["final_loss"] == pytest.approx(losses[-1])
    assert wb["config"]["cluster"]["num_workers"] == 2

    manifest = json.loads((tmp_path / "data" / "sample" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] > 1000

    # The same command again: the run is done, which the driver sees without starting Ray or workers.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"[train] e2e already finished at step 12 ({ckpt})" in again.stdout and "training finished" in again.stdout
    assert "[ray]" not in again.stdout + again.stderr and read_summary(run_dir) == summary


def test_a_killed_worker_is_restarted_from_the_checkpoint_and_matches_an_uninterrupted_run(tmp_path):
    from cluster.config import compose_config
    from corpus import make_documents, write_jsonl
    from data_pipelines.prepare import prepare
    from distributed import run_ranks
    from test_train_loop import SMALL_MODEL
    from trainer.train_loop import train

    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_documents(300, seed=12))
    overrides = [*SMALL_MODEL, f"storage_path={tmp_path}", f"data.sources=[{{name:gen,path:{corpus}}}]",
                 "data.workers=0", "logger=none", "train.max_steps=6", "train.warmup_steps=2",
                 "train.micro_batch_size=4", "train.loader_workers=0", "train.checkpoint_every=2"]
    reference = compose_config([*overrides, "run.name=reference"])
    prepare(reference["data"], reference["tokenizer"])
    expected = run_ranks(2, train, reference)[0]["losses"]

    cmd = [sys.executable, "-m", "cluster.cli", "train", *overrides, "run.name=faulty", "cluster.max_failures=1",
           "train.faults.kill_at_step=5", "train.faults.kill_rank=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "faulty"
    assert (run_dir / ".fault_killed_at_step_5").exists()
    assert read_summary(run_dir)["resumed_from"] == "step_4"
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert [r["loss"] for r in records] == expected


def test_an_elastic_run_trains_on_the_workers_that_fit_and_grows_when_relaunched(tmp_path):
    from cluster.config import compose_config
    from corpus import make_documents, write_jsonl
    from data_pipelines.prepare import prepare
    from distributed import run_ranks
    from test_train_loop import SMALL_MODEL
    from trainer.train_loop import train

    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_documents(300, seed=14))
    overrides = [*SMALL_MODEL, f"storage_path={tmp_path}", f"data.sources=[{{name:gen,path:{corpus}}}]",
                 "data.workers=0", "logger=none", "train.max_steps=6", "train.warmup_steps=2",
                 "train.micro_batch_size=4", "train.loader_workers=0", "train.checkpoint_every=2"]
    reference = compose_config([*overrides, "run.name=reference"])  # 2 ranks throughout
    prepare(reference["data"], reference["tokenizer"])
    expected = run_ranks(2, train, reference)[0]["losses"]

    elastic = [sys.executable, "-m", "cluster.cli", "train", *overrides, "run.name=elastic", "cluster.min_workers=1"]
    # Room for one worker of 3 CPUs in the embedded Ray's 4: it trains alone, accumulating 2 micro-batches,
    # until its node is "lost" at step 5 (the last checkpoint: step 4).
    first = subprocess.run([*elastic, "cluster.cpus_per_worker=3", "train.faults.kill_at_step=5"],
                           capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert first.returncode == 1 and "1 rank, ZeRO-2" in first.stdout + first.stderr
    # Relaunched where two fit: the group grows, and the run goes on as if it had had two all along.
    second = subprocess.run(elastic, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert "step_4 was saved by 1 rank: converted for 2" in out and "2 ranks, ZeRO-2" in out
    run_dir = tmp_path / "outputs" / "elastic"
    assert read_summary(run_dir)["resumed_from"] == "step_4"
    losses = [json.loads(line)["loss"] for line in open(run_dir / "metrics.jsonl")]
    assert losses == pytest.approx(expected, rel=1e-6)


def test_sigterm_or_ctrl_c_to_the_ray_driver_checkpoints_and_the_rerun_resumes(tmp_path):
    import signal

    from corpus import make_documents, write_jsonl
    from test_train_loop import SMALL_MODEL

    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_documents(300, seed=13))
    cmd = [sys.executable, "-m", "cluster.cli", "train", *SMALL_MODEL, f"storage_path={tmp_path}",
           f"data.sources=[{{name:gen,path:{corpus}}}]", "data.workers=0", "logger=none", "train.max_steps=200",
           "train.warmup_steps=2", "train.micro_batch_size=4", "train.loader_workers=0", "train.log_every=1",
           "run.name=preempted", "cluster.dashboard=true"]
    run_dir = tmp_path / "outputs" / "preempted"

    def stopped(signum, when: str, on_line=lambda line: None) -> tuple[str, dict]:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
        seen = []
        for line in proc.stdout:
            seen.append(line)
            on_line(line)
            if when in line:
                proc.send_signal(signum)
                break
        rest, _ = proc.communicate(timeout=600)
        out = "".join(seen) + rest
        assert proc.returncode == 0, out[-3000:]
        name = signal.Signals(signum).name
        assert f"stop requested ({name} to the driver)" in out and f"stopped on request ({name} to the driver" in out
        summary = read_summary(run_dir)
        assert summary["stopped_by"] == f"{name} to the driver" and summary["checkpoint"].endswith(f"step_{summary['steps']}")
        assert not (run_dir / "STOP").exists()  # consumed: the next launch is not stopped by it
        return out, summary

    # Preempted as the workers start, before any trains: the request waits for the first step.
    _, first = stopped(signal.SIGTERM, "[elmforge] preempted: starting 2 Ray Train worker(s)")
    assert first["steps"] == 1

    dashboard = []

    def dashboard_serves(line: str) -> None:  # asked for, the embedded instance's dashboard serves while it trains
        if line.startswith("[ray] dashboard: "):
            dashboard.append(line.split(": ", 1)[1].strip())
        if "[train] step 3/200" in line:
            token = auth_token()  # the instance's own, as for any cluster Ray 2.60 starts
            version = requests.get(f"{dashboard[0]}/api/version", headers={"Authorization": f"Bearer {token}"}, timeout=60)
            assert version.status_code == 200 and "ray_version" in version.json(), version.text

    # The same command again resumes from that checkpoint; Ctrl-C (SIGINT) stops it the same way. 200
    # steps are far more than the driver needs to pass it on. (That a resume continues exactly as an
    # uninterrupted run would: tests/test_equivalence.py; under Ray: the killed-worker test above.)
    _, second = stopped(signal.SIGINT, "[train] step 4/200", dashboard_serves)
    assert second["resumed_from"] == "step_1" and 4 <= second["steps"] < 200
    steps = [json.loads(line)["step"] for line in open(run_dir / "metrics.jsonl")]
    assert steps == list(range(1, second["steps"] + 1))

    # The injected preemption under Ray, where the loop runs in a worker thread no signal reaches: as the
    # driver does on SIGTERM, it asks through run.dir/STOP, and every rank checkpoints and stops.
    at = second["steps"] + 2
    done = subprocess.run([*cmd, f"train.faults.sigterm_at_step={at}"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    third = read_summary(run_dir)
    assert third["stopped_by"] == "train.faults.sigterm_at_step" and third["steps"] == at
    assert third["checkpoint"].endswith(f"step_{at}") and not (run_dir / "STOP").exists()


def test_training_that_fails_on_a_worker_ends_with_one_clear_message(tmp_path):
    from corpus import make_documents, write_jsonl
    from test_train_loop import SMALL_MODEL

    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_documents(200, seed=17))
    cmd = [sys.executable, "-m", "cluster.cli", "train", *SMALL_MODEL, f"storage_path={tmp_path}",
           f"data.sources=[{{name:gen,path:{corpus}}}]", "data.workers=0", "logger=none", "train.max_steps=6",
           "train.warmup_steps=2", "train.micro_batch_size=4", "train.loader_workers=0", "cluster.num_workers=1",
           "cluster.max_failures=2", "train.checkpoint_every=1", "train.faults.nonfinite_at_steps=[3,4]",
           "train.max_skipped_in_row=2", "run.name=diverged"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The error is the last word: the workers' tracebacks Ray held back as repeats come before it.
    *_, message, hint = proc.stderr.strip().splitlines()
    assert message.startswith("elmforge train:") and hint == "(set ELMFORGE_DEBUG=1 for a traceback)", \
        proc.stderr[-3000:]
    assert "rank 0: NonFiniteTraining: training stopped at step 4" in message, message
    assert "last good checkpoint is step_3" in message and "not retried" in message
    # Ray restarted the workers twice, and each restart failed at once: no step was trained again.
    steps = [json.loads(line)["step"] for line in open(tmp_path / "outputs/diverged/metrics.jsonl")]
    assert steps == [1, 2, 3, 4]
    assert not list((tmp_path / "outputs/diverged").glob(".gave_up*"))

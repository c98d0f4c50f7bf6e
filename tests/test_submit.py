"""Submission to a real Ray head on 127.0.0.1 with token authentication."""

import json
import os
import re
import subprocess
import sys
import time
import zipfile
from datetime import datetime
from pathlib import Path

import pytest
import requests

from cluster import submit
from cluster.cli import main
from cluster.config import compose_config
from corpus import make_documents, write_jsonl
from ray_head import start_head
from test_train_loop import SMALL_MODEL
from trainer.distributed import free_port

pytestmark = pytest.mark.integration
PLANTED = "planted-wandb-key-5f0c1d2e3a4b"
REPO = Path(__file__).resolve().parent.parent
CLOSED = "http://127.0.0.1:1"  # nothing listens there; a privileged port, so no Ray or test server takes it
TO_CLOSED = f"submit.address={CLOSED}"
FAILS_FAST = ["data.sources=[{name:none,path:/nonexistent/*.jsonl}]", "data.workers=0"]  # in the job's prepare


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    head = start_head(tmp_path_factory.mktemp("head") / "ray.log")
    yield head
    head.stop()


@pytest.fixture
def as_user(head, monkeypatch, tmp_path):
    """The submitting user: the cluster's token in RAY_AUTH_TOKEN, a W&B key in the environment, no token file."""
    monkeypatch.setenv("RAY_AUTH_TOKEN", head.token)
    monkeypatch.setenv("WANDB_API_KEY", PLANTED)
    monkeypatch.setattr(submit, "TOKEN_FILE", tmp_path / "no_token_file")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(REPO)  # the working directory that travels with the job
    return head


def test_a_new_cluster_lists_no_jobs_and_says_so(as_user, capsys):  # first: the module's head is new
    assert main(["jobs", "list", f"submit.address={as_user.address}"]) == 0
    assert capsys.readouterr().out == f"no jobs on {as_user.address}\n"


def test_submit_address_wins_over_the_address_variables_ray_reads(as_user, monkeypatch, capsys):
    monkeypatch.setenv("RAY_ADDRESS", CLOSED)  # Ray's client would take these over the address it is given
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", CLOSED)
    assert main(["jobs", "list", f"submit.address={as_user.address}"]) == 0, capsys.readouterr().err
    assert os.environ["RAY_ADDRESS"] == os.environ["RAY_API_SERVER_ADDRESS"] == CLOSED  # left as they were
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a cluster's GCS address, not its Jobs API
    assert main(["jobs", "list"]) == 2
    assert "RAY_ADDRESS=127.0.0.1:6379: the Ray Jobs API is an http(s) address" in capsys.readouterr().err


def test_submit_the_demo_job_wait_for_success_and_read_its_logs(as_user, tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_documents(200, seed=3))
    overrides = [*SMALL_MODEL, f"storage_path={tmp_path}", f"data.sources=[{{name:gen,path:{corpus}}}]",
                 "data.workers=0", "train.max_steps=3", "train.warmup_steps=1", "train.micro_batch_size=4",
                 "run.name=submitted", f"submit.address={as_user.address}"]
    assert main(["submit", *overrides, "--wait"]) == 0
    out = capsys.readouterr().out
    job_id = out.split("[submit] job ")[1].split()[0]
    assert f"{as_user.address}/#/jobs/{job_id}" in out
    assert "training finished" in out and ": SUCCEEDED" in out
    assert (tmp_path / "outputs/submitted/checkpoints/step_3/COMPLETE").is_file()

    assert main(["jobs", "status", job_id, f"submit.address={as_user.address}"]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out
    assert main(["jobs", "logs", job_id, f"submit.address={as_user.address}"]) == 0
    logs = capsys.readouterr().out
    assert "[train] step 3/3" in logs
    assert main(["jobs", "list", f"submit.address={as_user.address}"]) == 0
    assert job_id in capsys.readouterr().out
    for action in ("status", "logs", "stop"):  # an unknown id: one line, not the client's traceback
        assert main(["jobs", action, "nosuchjob", f"submit.address={as_user.address}"]) == 1
        err = capsys.readouterr().err
        assert err == "elmforge jobs: nosuchjob: no such job on this cluster (see `elmforge jobs list`)\n"
    with pytest.raises(submit.SubmitError, match="nosuchjob: no such job"):  # as `submit --wait` follows a job
        submit.follow({"address": as_user.address}, "nosuchjob")

    # The W&B key of the submitting user is in no job record and no log.
    client = submit.client({"address": as_user.address})
    info = client.get_job_info(job_id)
    records = json.dumps([j.model_dump() for j in client.list_jobs()], default=str)
    assert PLANTED not in json.dumps(info.model_dump(), default=str)
    assert PLANTED not in records and PLANTED not in logs
    assert info.model_dump().get("entrypoint_num_cpus") in (0, None, 0.0)
    wandb_files = " ".join(p.read_text(errors="ignore") for p in (tmp_path / "outputs").rglob("*.json") if p.is_file())
    assert PLANTED not in wandb_files


def test_a_running_job_is_followed_then_stopped(as_user, tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_documents(200, seed=4))
    address = f"submit.address={as_user.address}"
    overrides = [*SMALL_MODEL, f"storage_path={tmp_path}", f"data.sources=[{{name:gen,path:{corpus}}}]",
                 "data.workers=0", "logger=none", "train.max_steps=100000", "train.warmup_steps=1",
                 "train.micro_batch_size=4", "train.log_every=1", "run.name=long", address]
    assert main(["submit", *overrides]) == 0
    job_id = capsys.readouterr().out.split("[submit] job ")[1].split()[0]
    jobs = submit.client({"address": as_user.address})
    deadline = time.monotonic() + 300
    while "[train] step 2/100000" not in jobs.get_job_logs(job_id):
        status = jobs.get_job_status(job_id).value
        assert status in ("PENDING", "RUNNING") and time.monotonic() < deadline, jobs.get_job_logs(job_id)[-3000:]
        time.sleep(1)
    # A second job for the same run would write the same run.dir: refused while the first runs.
    assert main(["submit", *overrides]) == 1
    assert f"run.name=long is being trained by job {job_id} (RUNNING)" in capsys.readouterr().err
    # The same run.name under another storage_path is another run.dir: not refused.
    other = {"name": "long", "dir": str(tmp_path / "elsewhere/outputs/long")}
    assert submit._refuse_a_second_writer(jobs, other, as_user.address) is None
    assert main(["jobs", "stop", job_id, address]) == 0
    assert f"{job_id}: stop requested" in capsys.readouterr().out
    assert main(["jobs", "logs", job_id, "--follow", address]) == 1  # returns once the job has ended: STOPPED
    followed = capsys.readouterr().out
    assert "[train] step 1/100000" in followed and "[train] step 2/100000" in followed
    assert main(["jobs", "status", job_id, address]) == 1  # as `submit --wait` of a stopped job
    assert f"{job_id}: STOPPED" in capsys.readouterr().out


def test_a_failing_job_makes_wait_and_status_exit_non_zero(as_user, tmp_path, capsys):
    address = f"submit.address={as_user.address}"
    overrides = [f"storage_path={tmp_path}", *FAILS_FAST, address]
    assert main(["submit", *overrides, "--wait"]) == 1
    job_id = capsys.readouterr().out.split("[submit] job ")[1].split()[0]
    assert main(["jobs", "status", job_id, address]) == 1  # scripts can tell a failed job by the exit status
    status = capsys.readouterr().out  # one line, without the log tail Ray's message carries
    assert status.startswith(f"{job_id}: FAILED - ") and status.endswith(f"(its log: elmforge jobs logs {job_id})\n")
    assert status.count("\n") == 1 and "\x1b" not in status, status
    # Ctrl-C while following (`submit --wait`, `jobs logs --follow`) stops the watching, and says so.
    class CtrlC:
        def write(self, text):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        submit.follow(compose_config([address])["submit"], job_id, out=CtrlC())
    assert f"stopped following job {job_id}; the job itself is not stopped (`elmforge jobs stop {job_id}`" in \
        capsys.readouterr().err
    # A reader that stops early (`jobs list | head -1`) is not a cluster that cannot be reached.
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "jobs", "list", address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    proc.stdout.close()
    assert proc.wait(timeout=120) == 141 and proc.stderr.read() == b""


class _SameSecond(datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2026, 3, 1, 12, 0, 0)


def test_twin_submissions_in_one_second_get_their_own_ids_and_leave_storage_in_the_working_dir_behind(
        as_user, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"  # the working directory that travels, with the job's storage inside it
    storage = work / "st?re"  # a glob character: its exclude pattern must not match the "store" beside it
    (storage / "outputs").mkdir(parents=True)
    (storage / "outputs/big.bin").write_bytes(bytes(1 << 20))
    (work / "store").mkdir()
    (work / "store/notes.txt").write_text("travels")
    credentials = [".env", "conf/.netrc", ".ray/auth_token", "certs/node.pem", "certs/node.key"]
    for name in credentials:  # never uploaded, whatever submit.excludes says
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text("secret")
    monkeypatch.setattr(submit, "datetime", _SameSecond)
    address = f"submit.address={as_user.address}"
    args = ["submit", f"storage_path='{storage}'", f"submit.working_dir={work}", "run.name=twin", *FAILS_FAST,
            address]  # storage_path quoted, as Hydra allows
    ids = []
    jobs = submit.client({"address": as_user.address})
    for _ in range(2):
        assert main(args) == 0, capsys.readouterr().err
        ids.append(capsys.readouterr().out.split("[submit] job ")[1].split()[0])
        jobs.stop_job(ids[-1])  # only its record is needed; the next one for this run waits for its end
        while jobs.get_job_status(ids[-1]).value not in submit.TERMINAL:
            time.sleep(0.2)
    assert ids[0] != ids[1] and all(i.startswith("elmforge-twin-20260301-120000-") for i in ids)

    # The package Ray builds from the runtime_env the cluster stored for the job leaves the storage behind.
    from ray._private.runtime_env.packaging import create_package

    excludes = jobs.get_job_info(ids[0]).runtime_env["excludes"]
    create_package(str(work), tmp_path / "package.zip", include_gitignore=True, excludes=excludes)
    names = zipfile.ZipFile(tmp_path / "package.zip").namelist()
    assert "store/notes.txt" in names and not [n for n in names if "big.bin" in n], names
    assert not set(credentials) & set(names), names

    # A refusal by the Jobs API is reported as one, with the server's reason.
    monkeypatch.setattr(submit, "token_hex", lambda n: ids[0].rsplit("-", 1)[1])
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"rejected the request (HTTP 500): Job with submission_id {ids[0]} already exists" in err
    assert "cannot reach" not in err


def test_requests_without_the_token_are_refused(head, monkeypatch, tmp_path, capsys):
    assert requests.get(f"{head.address}/api/jobs/", timeout=60).status_code == 401  # a busy host answers late
    monkeypatch.setattr(submit, "TOKEN_FILE", tmp_path / "no_token_file")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    with pytest.raises(submit.SubmitError, match="requires an authentication token.*RAY_AUTH_TOKEN"):
        submit.client({"address": head.address})
    monkeypatch.setenv("RAY_AUTH_TOKEN", "wrong-token")
    with pytest.raises(submit.SubmitError, match="refused the authentication token"):
        submit.client({"address": head.address})
    (tmp_path / "token").write_text(head.token + "\n")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setattr(submit, "TOKEN_FILE", tmp_path / "token")
    submit.client({"address": head.address})  # the token file works too
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    submit.client({"address": head.address})  # and so does one named by RAY_AUTH_TOKEN_PATH
    # A file named by RAY_AUTH_TOKEN_PATH that is missing is an error, not a silent fall back to ~/.ray/auth_token.
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(submit.SubmitError, match=re.escape(f"RAY_AUTH_TOKEN_PATH={tmp_path}/missing: does not exist")):
        submit.client({"address": head.address})
    assert main(["jobs", "list", f"submit.address={head.address}"]) == 1
    assert head.token not in capsys.readouterr().err


def test_submit_shows_only_its_own_lines_and_jobs_list_is_a_table(as_user, tmp_path, capsys):
    # Ray's SDK would log each step of packaging the working directory on stderr (ten lines).
    env = {**os.environ, "RAY_AUTH_TOKEN": as_user.token}
    cmd = [sys.executable, "-m", "cluster.cli", "submit", f"storage_path={tmp_path}", *FAILS_FAST, "run.name=a",
           f"submit.address={as_user.address}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert main(["submit", f"storage_path={tmp_path}", *FAILS_FAST, "run.name=a-longer-name",
                 f"submit.address={as_user.address}"]) == 0
    ids = [done.stdout.split()[2], capsys.readouterr().out.split()[2]]
    assert main(["jobs", "list", f"submit.address={as_user.address}"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert len({lines[i].index(lines[i].split()[1]) for i in ids}) == 1  # the status column lines up




@pytest.mark.parametrize("overrides, message", [
    (["storage_path=/tmp/x"], "no cluster to submit to: set submit.address=http://<head>:8265 or RAY_ADDRESS"),
    (["storage_path=/tmp/x", "submit.address=127.0.0.1:8265"],
     "submit.address=127.0.0.1:8265: the Ray Jobs API is an http(s) address"),
    ([TO_CLOSED], "submit needs storage_path=<absolute path on the cluster's"),
    (["storage_path=store", TO_CLOSED],
     "storage_path=store is relative; submit needs storage_path=<absolute path"),
    (["storage_path=/tmp/x", "storage_path=store", TO_CLOSED],  # the last one is the job's
     "storage_path=store is relative; submit needs storage_path=<absolute path"),
    (["storage_path=/tmp/x", "run.dir=outputs/a", TO_CLOSED],  # written in the job's temporary copy, then lost
     "run.dir=outputs/a is relative; submit needs run.dir=<absolute path"),
    (["storage_path=/tmp/x", "++data.dir='data/mine'", TO_CLOSED],
     "data.dir=data/mine is relative; submit needs data.dir=<absolute path"),
    (["sweep=lr_tiny", "storage_path=/tmp/x", TO_CLOSED],
     "sweep=lr_tiny: submit sends `elmforge train`, which does not sweep; run `elmforge sweep` on a cluster node"),
])
def test_submit_config_mistakes_exit_2_before_reaching_a_cluster(overrides, message, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["submit", *overrides]) == 2
    assert capsys.readouterr().err.startswith(f"elmforge submit: config error\n{message}")


def test_submit_takes_a_home_relative_or_derived_run_and_data_dir(capsys):
    # ~ is the job node's home, null the default under storage_path: neither is written in Ray's temporary copy.
    assert main(["submit", "storage_path=/tmp/x", "data.dir=null", "run.dir='~/runs/a'", f"submit.address={CLOSED}"]) == 1
    assert f"cannot reach the Ray Jobs API at {CLOSED}" in capsys.readouterr().err  # past the config checks


def test_a_cluster_that_does_not_answer_is_one_line_with_the_fix(capsys):
    expected = (f"cannot reach the Ray Jobs API at {CLOSED} (connection refused): is the cluster up, and is this its "
                "dashboard address (http://<head>:8265, or a port-forward to it)? Set submit.address or RAY_ADDRESS")
    for argv in (["submit", "storage_path=/tmp/x"], ["jobs", "logs", "some-id", "--follow"]):
        assert main([*argv, f"submit.address={CLOSED}"]) == 1
        assert capsys.readouterr().err == f"elmforge {argv[0]}: {expected}\n"
    # A cluster that goes away while a job is followed: the SDK passes on the error of requests itself.
    with pytest.raises(requests.ConnectionError) as raised:
        requests.get(CLOSED, timeout=5)
    assert submit.explain(raised.value, CLOSED) == expected


def test_a_working_directory_too_large_to_upload_names_submit_excludes():
    # The text of the SDK's error for the server's 413 (aiohttp's limit on the zipped working directory).
    error = RuntimeError("Request failed with status code 413: Maximum request body size 104857600 exceeded, "
                         "actual body size 362051584.")
    message = submit.explain(error, CLOSED)
    assert message.startswith(f"the Ray Jobs API at {CLOSED} refused the working directory's upload as too large "
                              "(HTTP 413: Maximum request body size 104857600 exceeded, actual body size 362051584): ")
    assert "submit.excludes" in message and ".." not in message


@pytest.mark.parametrize("env, address, message", [
    ({"RAY_ADDRESS": "127.0.0.1:{port}"}, "auto", "cluster.address=auto: no Ray cluster answers at "),
    ({"RAY_ADDRESS": "http://127.0.0.1:8265"}, "auto",
     "RAY_ADDRESS=http://127.0.0.1:8265 is a Jobs API address (for elmforge submit and jobs), which "
     "cluster.address=auto cannot join: unset RAY_ADDRESS on a cluster node"),
    # An explicit address: RAY_ADDRESS, which only `auto` reads, is no matter.
    ({"RAY_ADDRESS": "http://127.0.0.1:8265"}, "127.0.0.1:{port}", "cluster.address=127.0.0.1:{port}: no Ray cluster"),
    ({}, "http://127.0.0.1:8265",
     "cluster.address=http://127.0.0.1:8265 is a Jobs API address (that is submit.address)"),
    ({}, "ray://127.0.0.1:{port}",
     "cluster.address=ray://127.0.0.1:{port}: no Ray cluster answers at 127.0.0.1:{port} (connection refused)"),
    ({"RAY_TMPDIR": "{tmp}"}, "auto",  # where `ray start` notes its cluster: none was started
     "cluster.address=auto: no Ray cluster was started on this machine (`ray start`) and RAY_ADDRESS is not set"),
])
def test_joining_a_cluster_that_does_not_answer_fails_at_once_in_one_line(tmp_path, env, address, message):
    # Ray's client would retry a GCS that is not there for minutes (a head that is down, a stale
    # /tmp/ray/ray_current_cluster); a sweep joins its cluster before it prepares anything.
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
           **{k: v.format(port=port, tmp=tmp_path) for k, v in env.items()}}
    cmd = [sys.executable, "-m", "cluster.cli", "sweep", "sweep=lr_tiny",
           f"cluster.address={address.format(port=port)}", f"storage_path={tmp_path}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 1
    assert done.stderr.startswith(f"elmforge sweep: {message.format(port=port)}"), done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr  # the whole story: no traceback would add to it
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.parametrize("door, said", [
    ("client", "the Ray Client server did not let this client in"),  # it lets a client without the token time out
    ("gcs", "Failed to connect to Ray cluster"),  # it refuses one, after Ray's own retries
])
def test_joining_a_token_cluster_without_the_token_mode_names_the_fix(head, tmp_path, door, said):
    address = getattr(head, door)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    cmd = [sys.executable, "-m", "cluster.cli", "sweep", "sweep=lr_tiny", f"cluster.address={address}",
           f"storage_path={tmp_path}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**env, "RAY_AUTH_TOKEN": head.token},
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 1
    last = done.stderr.splitlines()[-1]
    assert last.startswith(f"elmforge sweep: cluster.address={address}: {said}"), done.stderr[-2000:]
    assert "needs RAY_AUTH_MODE=token and its token" in last


def test_jobs_without_an_action_names_the_actions_and_shows_the_usage(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["jobs"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "an action is required: list, status, logs, stop" in err
    assert "usage: elmforge jobs {list,status,logs,stop} [job_id]" in err and "overrides" not in err


@pytest.mark.parametrize("argv, message", [
    (["submit", "--wiat"], "usage: elmforge submit [-h] [--cfg {job}] [--wait]"),  # the verb's usage, not elmforge's
    (["jobs", "status"], "jobs status needs a job id (see `elmforge jobs list`)"),
    (["jobs", "stop", "submit.address=http://127.0.0.1:9"], "jobs stop needs a job id"),
    (["jobs", "status", "some-id", "--follow"], "--follow applies to `jobs logs` only"),
])
def test_usage_errors_exit_2_before_reaching_a_cluster(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_jobs_list_shows_submitted_jobs_not_the_drivers_that_joined_the_cluster(as_user, capsys):
    # A driver that joins the cluster directly (a sweep run on the head) is a Ray job without a submission
    # id: `jobs logs` and `jobs stop` could do nothing with it.
    joined = subprocess.run(
        [sys.executable, "-c", "import ray; ray.init(address='%s'); print(ray.get_runtime_context().get_job_id())"
         % as_user.gcs], capture_output=True, text=True, timeout=120,
        env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": as_user.token})
    assert joined.returncode == 0, joined.stderr[-2000:]
    driver = joined.stdout.split()[-1]
    assert driver in [job.job_id for job in submit.client({"address": as_user.address}).list_jobs()]
    assert main(["jobs", "list", f"submit.address={as_user.address}"]) == 0
    listed = capsys.readouterr().out
    assert driver not in listed, listed
    assert listed.endswith("(and 1 Ray driver that joined the cluster without `elmforge submit`: "
                           "`ray list jobs` shows them)\n"), listed
    assert "SUCCEEDED" in listed  # the module's submitted jobs are still there


def test_a_follower_fetches_the_log_less_often_as_it_grows():
    # Each answer is the whole log: a days-long run's (megabytes) is not fetched every second, nor more
    # seldom than once a minute.
    assert submit.logs_interval(1.0, 0) == submit.logs_interval(1.0, 50_000) == 1.0
    three_mb, six_mb = submit.logs_interval(1.0, 3_000_000), submit.logs_interval(1.0, 6_000_000)
    assert three_mb > 1.0
    assert six_mb > three_mb
    assert six_mb == 60.0
    assert submit.logs_interval(1.0, 100_000_000) == 60.0

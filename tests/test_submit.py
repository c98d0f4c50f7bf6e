"""Submission to a real Ray head on 127.0.0.1 with token authentication."""

import json
import re
import time
import zipfile
from datetime import datetime
from pathlib import Path

import pytest
import requests

from cluster import submit
from cluster.cli import main
from corpus import make_documents, write_jsonl
from ray_head import start_head
from test_train_loop import SMALL_MODEL

pytestmark = pytest.mark.integration
PLANTED = "planted-wandb-key-5f0c1d2e3a4b"
REPO = Path(__file__).resolve().parent.parent
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
        assert "nosuchjob: no such job on this cluster (see `elmforge jobs list`)" in capsys.readouterr().err
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
    assert f"{job_id}: FAILED" in capsys.readouterr().out


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

    # A refusal by the Jobs API is reported as one, with the server's reason.
    monkeypatch.setattr(submit, "token_hex", lambda n: ids[0].rsplit("-", 1)[1])
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"rejected the request (HTTP 500): Job with submission_id {ids[0]} already exists" in err
    assert "cannot reach" not in err


def test_requests_without_the_token_are_refused(head, monkeypatch, tmp_path, capsys):
    assert requests.get(f"{head.address}/api/jobs/", timeout=5).status_code == 401
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


def test_submit_refuses_a_relative_storage_path(as_user, capsys):
    assert main(["submit", f"submit.address={as_user.address}"]) == 1
    assert "storage_path=<absolute path" in capsys.readouterr().err


def test_jobs_without_an_action_names_the_actions_and_shows_the_usage(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["jobs"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "an action is required: list, status, logs, stop" in err
    assert "usage: elmforge jobs {list,status,logs,stop} [job_id]" in err and "overrides" not in err


@pytest.mark.parametrize("argv, message", [
    (["jobs", "status"], "jobs status needs a job id (see `elmforge jobs list`)"),
    (["jobs", "stop", "submit.address=http://127.0.0.1:9"], "jobs stop needs a job id"),
    (["jobs", "status", "some-id", "--follow"], "--follow applies to `jobs logs` only"),
])
def test_jobs_usage_errors_exit_2_before_reaching_a_cluster(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2 and message in capsys.readouterr().err

"""Send elmforge jobs to a Ray cluster through the Ray Jobs API, and manage them.

The job carries the working directory (minus data, outputs, environments and
the job's own storage where it lies inside) and the user's overrides; it
composes its config on the cluster, joins that cluster (cluster.address=auto)
and needs no CPU of its own (the entrypoint only drives the workers). Secrets
never travel with the job: runtime_env is stored by the cluster and shown by
its dashboard, so the W&B key must come from the cluster's own environment or
secret store.

Token authentication (Ray 2.60 turns it on for clusters it starts): the token
comes from RAY_AUTH_TOKEN, the file named by RAY_AUTH_TOKEN_PATH, or
~/.ray/auth_token, and is sent as a bearer header.
"""

import os
import re
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path, PurePath
from secrets import token_hex
from typing import Iterable, Optional

from cluster.config import ConfigError
from cluster.quiet_logs import errors_only

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
UNSUCCESSFUL = ("FAILED", "STOPPED")  # `submit --wait` and `jobs status` exit 1 on these
AGENT_WAIT_S = 180  # a head just started (or loaded) can take a while to start its job agent
PACKAGING_LOGGERS = tuple(f"ray.{name}" for name in (
    "_private.runtime_env.packaging", "_private.runtime_env.working_dir", "dashboard.modules.dashboard_sdk"))
TOKEN_FILE = Path.home() / ".ray" / "auth_token"
TOKEN_HELP = (
    "set RAY_AUTH_TOKEN to the cluster's token, or write it to ~/.ray/auth_token "
    "(on the head node, `ray get-auth-token` prints it)"
)


class SubmitError(ValueError):
    """What the cluster said (or that it said nothing), complete in one line: no traceback would add to it."""


class ClusterUnreachable(ConnectionError):
    """A Ray cluster to join (cluster.address) does not answer or let us in: complete in one line."""


def resolve_address(submit_cfg: dict) -> str:
    """submit.address, else RAY_ADDRESS."""
    key = "submit.address" if submit_cfg.get("address") else "RAY_ADDRESS"
    address = submit_cfg.get("address") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("no cluster to submit to: set submit.address=http://<head>:8265 or RAY_ADDRESS")
    if not address.startswith(("http://", "https://")):
        raise ConfigError(f"{key}={address}: the Ray Jobs API is an http(s) address, e.g. http://<head>:8265")
    return address.rstrip("/")


@contextmanager
def _without_address_variables():
    """Ray's client takes RAY_API_SERVER_ADDRESS or RAY_ADDRESS over the address it is given: the job,
    and the token, would go to the cluster the environment names, not to submit.address."""
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def auth_token() -> Optional[str]:
    """The cluster token: RAY_AUTH_TOKEN, else the file at RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    if token:
        return token
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if named:  # a file the user named must hold the token: falling back would hide the mistake
        path = Path(named).expanduser()
        token = path.read_text().strip() if path.is_file() else ""
        if not token:
            problem = "is empty" if path.is_file() else "does not exist"
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={named}: {problem}; point it at the cluster's token file, "
                              "or unset it to use RAY_AUTH_TOKEN or ~/.ray/auth_token")
        return token
    return (TOKEN_FILE.read_text().strip() if TOKEN_FILE.is_file() else "") or None


def client(submit_cfg: dict):
    """A JobSubmissionClient that sends the token; auth failures become one clear message."""
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(submit_cfg)
    token = auth_token()
    # Always our header, even empty (the server reads that as "no token"): the SDK would
    # otherwise add a token of its own, from a lookup cached once per process.
    headers = {"Authorization": f"Bearer {token}" if token else ""}
    try:
        with _without_address_variables():
            return JobSubmissionClient(address, headers=headers)
    except Exception as e:  # the SDK raises bare RuntimeError/ConnectionError with the HTTP status inside
        raise SubmitError(explain(e, address)) from None


def http_failure(e: Exception) -> Optional[tuple[int, str]]:
    """(status, the server's message) of the SDK's error for an HTTP answer other than 2xx, else None."""
    found = re.match(r"Request failed with status code (\d+): (.*)", str(e), re.DOTALL)
    if not found:
        return None
    # The body is often a server-side traceback (the agent's own, nested): its last line says what went wrong.
    lines = [line.strip() for line in found[2].splitlines() if line.strip(" .")]
    message = re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1]) if lines else "no message"
    return int(found[1]), message


def explain(e: Exception, address: str) -> str:
    """One line for an error of the Jobs API client: no token, wrong token, a refusal, or no answer at all."""
    from ray.exceptions import AuthenticationError

    if isinstance(e, AuthenticationError):  # the SDK's own for a 401 or 403
        if e.message.startswith("Authentication required"):
            return f"{address} requires an authentication token and none was sent: {TOKEN_HELP}"
        source = " (from RAY_AUTH_TOKEN)" if os.environ.get("RAY_AUTH_TOKEN") else ""
        return f"{address} refused the authentication token{source}: {TOKEN_HELP}"
    failure = http_failure(e)
    if failure and failure[0] == 413:  # the upload of the working directory, zipped, over the server's limit
        return (f"the Ray Jobs API at {address} refused the working directory's upload as too large (HTTP 413: "
                f"{failure[1].rstrip('.')}): leave out what the job does not need with submit.excludes (data, "
                "outputs or checkpoints inside the repository, say), or submit from a smaller checkout")
    if failure:
        return f"the Ray Jobs API at {address} rejected the request (HTTP {failure[0]}): {failure[1]}"
    return (f"cannot reach the Ray Jobs API at {address} ({_no_answer_reason(e)}): is the cluster up, and is this "
            "its dashboard address (http://<head>:8265, or a port-forward to it)? Set submit.address or RAY_ADDRESS")


def _no_answer_reason(e: BaseException) -> str:
    """Why no answer came, in a few words: the OS's reason (connection refused, unknown host) found in the
    SDK's error or the requests error it replaced, whose text is a paragraph of connection-pool internals."""
    while e is not None:
        found = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)|(timed out)", str(e))
        if found:
            return (found[1] or found[2]).strip().lower()
        e = e.__cause__ or e.__context__
    return "no answer"


# Never uploaded, whatever submit.excludes says (gitignore patterns, at any depth): the package is stored in the
# cluster's GCS and unpacked on every node. The same list keeps them out of the images (.dockerignore).
CREDENTIALS = [".env", ".netrc", "auth_token", "*.pem", "*.key"]


def job_paths(cfg: dict) -> list[str]:
    """Where the job reads and writes: none of it may travel with the working directory."""
    return [cfg["storage_path"], cfg["run"]["dir"], cfg["data"]["dir"]]


def runtime_env(submit_cfg: dict, paths: Iterable[str] = ()) -> dict:
    """The working directory, without what must not be uploaded (`excludes`, and those of `paths` inside it).

    No env_vars: they are stored and shown.
    """
    working_dir = os.path.abspath(submit_cfg["working_dir"])
    inside = [pattern for pattern in (_anchored(p, working_dir) for p in paths) if pattern]
    return {"working_dir": working_dir,
            "excludes": [*submit_cfg["excludes"], *dict.fromkeys(inside), *CREDENTIALS]}


def _anchored(path: str, working_dir: str) -> Optional[str]:
    """`path` as an exclude pattern (gitignore syntax) anchored at `working_dir`; None unless strictly inside it."""
    # As given first (Ray walks the tree without resolving links), then resolved (one of them reached by a link).
    for p, root in ((path, working_dir), (os.path.realpath(path), os.path.realpath(working_dir))):
        p, root = PurePath(os.path.abspath(p)), PurePath(root)
        if p != root and p.is_relative_to(root):
            return "/" + re.sub(r"([][!*#?\\])", r"\\\1", p.relative_to(root).as_posix())
    return None


def entrypoint(overrides: list[str]) -> str:
    import shlex

    extra = [] if any(o.startswith("cluster.address=") for o in overrides) else ["cluster.address=auto"]
    return shlex.join(["python", "-m", "cluster.cli", "train", *overrides, *extra])


def new_job_id(run_name: str) -> str:
    """Readable and in submission order; the random suffix tells apart jobs submitted in the same second."""
    return f"elmforge-{run_name}-{datetime.now():%Y%m%d-%H%M%S}-{token_hex(2)}"


def submit_job(cfg: dict, overrides: list[str]) -> tuple[str, str]:
    """Submit the training job; returns (job id, dashboard URL of the job)."""
    submit_cfg = cfg["submit"]
    jobs = client(submit_cfg)
    _refuse_a_second_writer(jobs, cfg["run"], resolve_address(submit_cfg))
    job_id = new_job_id(cfg["run"]["name"])
    deadline, waited = time.monotonic() + AGENT_WAIT_S, False
    while True:
        try:
            # Ray's SDK logs each step of packaging the working directory: ten lines per submission, among
            # them warnings that .git and .venv are now left out by default (submit.excludes does anyway).
            with errors_only(*PACKAGING_LOGGERS):
                jobs.submit_job(
                    entrypoint=entrypoint(overrides),
                    submission_id=job_id,
                    runtime_env=runtime_env(submit_cfg, job_paths(cfg)),
                    entrypoint_num_cpus=submit_cfg["entrypoint_num_cpus"],
                    metadata={"run_name": cfg["run"]["name"], "run_dir": cfg["run"]["dir"]},
                )
            break
        except Exception as e:
            # A cluster that has just started answers before its job agent is up.
            if "No available agent" in str(e) and time.monotonic() < deadline:
                if not waited:
                    print(f"[submit] the cluster's job agent is not up yet: waiting for it (up to {AGENT_WAIT_S} s)",
                          flush=True)
                waited = True
                time.sleep(2)
                continue
            after = f" (after waiting {AGENT_WAIT_S} s for its job agent)" if waited else ""
            raise SubmitError(explain(e, resolve_address(submit_cfg)) + after) from None
    return job_id, f"{resolve_address(submit_cfg)}/#/jobs/{job_id}"


def _refuse_a_second_writer(jobs, run: dict, address: str) -> None:
    """One job per run: two would write the same run.dir (checkpoints, metrics) and corrupt each other's
    (a job submitted before jobs recorded their run.dir is told by its run.name)."""
    try:
        found = jobs.list_jobs()
    except (RuntimeError, OSError) as e:  # the SDK's errors, as elsewhere here
        raise SubmitError(explain(e, address)) from None
    for job in found:
        status = str(job.status.value)
        meta = job.metadata or {}
        same = meta["run_dir"] == run["dir"] if "run_dir" in meta else meta.get("run_name") == run["name"]
        if same and status not in TERMINAL:
            raise SubmitError(
                f"run.name={meta.get('run_name', run['name'])} is being trained by job {job.submission_id} ({status}) "
                f"in {meta.get('run_dir', 'the same run.dir')}: a second job would write the same run.dir; wait for it, "
                f"stop it (elmforge jobs stop {job.submission_id}), or choose another run.name (or run.dir)"
            )


def job_error(e: Exception, job_id: str, submit_cfg: dict) -> SubmitError:
    """One line for an error of the Jobs API about one job (the SDK's carry the HTTP answer in their text)."""
    failure = http_failure(e)
    if failure and failure[0] == 404:  # the Jobs API's answer for an unknown id
        return SubmitError(f"{job_id}: no such job on this cluster (see `elmforge jobs list`)")
    return SubmitError(explain(e, resolve_address(submit_cfg)))


def follow(submit_cfg: dict, job_id: str, out=None, poll_s: float = 1.0, retries: int = 5) -> str:
    """Print the job's logs as they come until it ends; returns its final status. A cluster that does not
    answer for a moment (a restarting head, a dropped port-forward) is asked again, `retries` times."""
    try:
        return _follow(submit_cfg, job_id, out or sys.stdout, poll_s, retries)
    except KeyboardInterrupt:  # Ctrl-C stops `elmforge train` itself, but here only the watching
        print(f"\n[submit] stopped following job {job_id}; the job itself is not stopped (`elmforge jobs stop "
              f"{job_id}` stops it)", file=sys.stderr, flush=True)
        raise


def _follow(submit_cfg: dict, job_id: str, out, poll_s: float, retries: int) -> str:
    jobs = client(submit_cfg)
    printed, failures, logs_due = 0, 0, 0.0
    while True:
        try:
            status = str(jobs.get_job_status(job_id).value)
            if status in TERMINAL or time.monotonic() >= logs_due:
                logs = jobs.get_job_logs(job_id)
                out.write(logs[printed:])
                out.flush()
                printed = len(logs)
                logs_due = time.monotonic() + logs_interval(poll_s, printed)
        except (RuntimeError, OSError) as e:
            failures += 1
            if http_failure(e) or failures > retries:  # an answer (404, 500) will not change by asking again
                raise job_error(e, job_id, submit_cfg) from None
            time.sleep(poll_s * 2**failures)
            continue
        failures = 0
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


# The Jobs API answers with the whole log each time: a days-long run's reaches megabytes, fetched every
# second for days (through a port-forward, often). Followers fetch it less often as it grows, so that
# about this many bytes a second are fetched, and at least once a minute (the status, asked every
# poll, still ends the following at once).
FOLLOW_BYTES_PER_S = 100_000
FOLLOW_LOGS_EVERY_MAX_S = 60.0


def logs_interval(poll_s: float, log_chars: int) -> float:
    return min(max(poll_s, log_chars / FOLLOW_BYTES_PER_S), FOLLOW_LOGS_EVERY_MAX_S)

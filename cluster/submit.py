"""Send elmforge jobs to a Ray cluster through the Ray Jobs API, and manage them.

The job carries the working directory (minus data, outputs and environments)
and the user's overrides; it composes its config on the cluster, joins that
cluster (cluster.address=auto) and needs no CPU of its own (the entrypoint
only drives the workers). Secrets never travel with the job: runtime_env is
stored by the cluster and shown by its dashboard, so the W&B key must come
from the cluster's own environment or secret store.

Token authentication (Ray 2.60 turns it on for clusters it starts): the token
comes from RAY_AUTH_TOKEN or ~/.ray/auth_token and is sent as a bearer header.
"""

import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_S = 60
TOKEN_FILE = Path.home() / ".ray" / "auth_token"
TOKEN_HELP = (
    "set RAY_AUTH_TOKEN to the cluster's token, or write it to ~/.ray/auth_token "
    "(on the head node, `ray get-auth-token` prints it)"
)


class SubmitError(ValueError):
    pass


def resolve_address(submit_cfg: dict) -> str:
    address = submit_cfg.get("address") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster to submit to: set submit.address=http://<head>:8265 or RAY_ADDRESS")
    if not address.startswith(("http://", "https://")):
        raise SubmitError(f"submit.address={address}: the Ray Jobs API is an http(s) address, e.g. http://<head>:8265")
    return address.rstrip("/")


def auth_token() -> Optional[str]:
    """The cluster token: RAY_AUTH_TOKEN, else the file at RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or TOKEN_FILE)
    if not token and path.is_file():
        token = path.read_text().strip()
    return token or None


def client(submit_cfg: dict):
    """A JobSubmissionClient that sends the token; auth failures become one clear message."""
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(submit_cfg)
    token = auth_token()
    # Always our header, even empty (the server reads that as "no token"): the SDK would
    # otherwise add a token of its own, from a lookup cached once per process.
    headers = {"Authorization": f"Bearer {token}" if token else ""}
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as e:  # the SDK raises bare RuntimeError/ConnectionError with the HTTP status inside
        raise SubmitError(_explain(e, address, token)) from None


def _explain(e: Exception, address: str, token: Optional[str]) -> str:
    text = str(e)
    if "401" in text or "Authentication required" in text:
        return f"{address} requires an authentication token and none was sent: {TOKEN_HELP}"
    if "403" in text or "Forbidden" in text or "Invalid authentication token" in text:
        return f"{address} refused the authentication token{' (from RAY_AUTH_TOKEN)' if os.environ.get('RAY_AUTH_TOKEN') else ''}: {TOKEN_HELP}"
    return f"cannot reach the Ray Jobs API at {address}: {text.splitlines()[0] if text else type(e).__name__}"


def runtime_env(submit_cfg: dict) -> dict:
    """The working directory, without what must not be uploaded. No env_vars: they are stored and shown."""
    return {"working_dir": os.path.abspath(submit_cfg["working_dir"]), "excludes": list(submit_cfg["excludes"])}


def entrypoint(overrides: list[str]) -> str:
    import shlex

    extra = [] if any(o.startswith("cluster.address=") for o in overrides) else ["cluster.address=auto"]
    return shlex.join(["python", "-m", "cluster.cli", "train", *overrides, *extra])


def submit_job(cfg: dict, overrides: list[str]) -> tuple[str, str]:
    """Submit the training job; returns (job id, dashboard URL of the job)."""
    submit_cfg = cfg["submit"]
    jobs = client(submit_cfg)
    job_id = f"elmforge-{cfg['run']['name']}-{datetime.now():%Y%m%d-%H%M%S}"
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            jobs.submit_job(
                entrypoint=entrypoint(overrides),
                submission_id=job_id,
                runtime_env=runtime_env(submit_cfg),
                entrypoint_num_cpus=submit_cfg["entrypoint_num_cpus"],
                metadata={"run_name": cfg["run"]["name"]},
            )
            break
        except Exception as e:
            # A cluster that has just started answers before its job agent is up.
            if "No available agent" in str(e) and time.monotonic() < deadline:
                time.sleep(2)
                continue
            raise SubmitError(_explain(e, resolve_address(submit_cfg), auth_token())) from None
    return job_id, f"{resolve_address(submit_cfg)}/#/jobs/{job_id}"


def follow(submit_cfg: dict, job_id: str, out=None, poll_s: float = 1.0) -> str:
    """Print the job's logs as they come until it ends; returns its final status."""
    out = out or sys.stdout
    jobs = client(submit_cfg)
    printed = 0
    while True:
        status = str(jobs.get_job_status(job_id).value)
        logs = jobs.get_job_logs(job_id)
        out.write(logs[printed:])
        out.flush()
        printed = len(logs)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)

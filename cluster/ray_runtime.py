"""Connect to Ray: an embedded instance on this machine, or an existing cluster.

cluster.address null starts Ray here with cluster.num_cpus logical CPUs (more
than the physical cores, so a 2-core laptop can schedule 2 workers) and, unless
cluster.dashboard, no dashboard: its processes took a third of Ray's CPU time
while training (bench/train_overhead.py), time the workers lose on a small
machine. `auto` joins the cluster this machine belongs to and `ray://host:10001`
connects as a client; an existing cluster brings its own resources.
"""

import os
import re
import socket
import sys
from typing import Optional

import ray

from cluster import ray_worker_setup
from cluster.config import ConfigError
from cluster.quiet_logs import errors_only
from cluster.submit import ClusterUnreachable, SubmitError, auth_token
from trainer.distributed import free_port

# Workers import deepspeed; this picks its CPU backend unless a GPU run overrides it.
# Ray Train's print patch sends each line through logging too, printing it twice.
# Worker processes that import torch and deepspeed on a busy machine (or wait for
# autoscaling) can take longer than Ray Train's default 60 s to start.
WORKER_ENV = {
    "DS_ACCELERATOR": "cpu",
    "WANDB_SILENT": "true",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
}


# A Ray Train controller that cannot start its worker group (too few CPUs or GPUs for the start
# timeout above) retries this many times, not forever; an autoscaling cluster adds nodes meanwhile.
CONTROLLER_RETRIES = 3


# An embedded Ray is one node that ends with the run, so it leaves out what only a lasting cluster
# uses: Python workers prestarted for jobs to come (this job's actors cannot use them: they lack its
# runtime_env), Ray Train's watcher for nodes being drained, and, without a dashboard to show them,
# Ray Train's metrics. Each is a process or periodic work on the cores the workers train on: Ray's
# own processes took a fifth less CPU per step without them (docs/benchmarks.md).
EMBEDDED_SYSTEM_CONFIG = {"enable_worker_prestart": False, "prestart_worker_first_driver": False}


def embedded_env(cluster: dict) -> dict:
    """Settings Ray Train reads from the environment (in the driver, the controller and the workers,
    which an embedded instance's processes inherit from the driver)."""
    env = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    if not cluster["dashboard"]:
        env["RAY_TRAIN_METRICS_ENABLED"] = "0"
    return env


def _hook(function) -> str:
    return f"{ray_worker_setup.__name__}.{function.__name__}"


def init_kwargs(cluster: dict, embedded_gcs: Optional[str] = None) -> dict:
    """Arguments for ray.init. No secrets here: runtime_env is stored and shown by the cluster.

    embedded_gcs (host:port, for cluster.address null) is told to every worker as RAY_ADDRESS.
    Ray's own lookup in a worker (the State API, which Ray Train's placement-group cleaner
    uses) reads /tmp/ray/ray_current_cluster, which only `ray start` writes: for an embedded
    instance it finds nothing, or a cluster long gone, and the cleaner dies, leaking the
    worker group's CPUs whenever a controller is killed (every trial Tune stops early). A joined
    cluster's GCS, where this process knows it (cluster.address host:port, or `auto` in a Ray job,
    whose RAY_ADDRESS Ray sets to it), is told alike: with a second Ray on a node, the file names
    the newer one.
    """
    env_vars = {k: os.environ.get(k, v) for k, v in WORKER_ENV.items()}
    if cluster["use_gpu"]:
        env_vars["DS_ACCELERATOR"] = "cuda"
    quiet = ray_worker_setup.quiet_train_controller
    if cluster["address"] is None and not cluster["dashboard"]:
        quiet = ray_worker_setup.quiet_placement_group_cleaner
    kwargs = {"runtime_env": {"env_vars": env_vars, "worker_process_setup_hook": _hook(quiet)}}
    if cluster["address"] is None:
        if embedded_gcs:
            env_vars["RAY_ADDRESS"] = embedded_gcs
        # "local": always a new instance here, never a cluster someone else started on this machine.
        return {**kwargs, "address": "local", "num_cpus": cluster["num_cpus"], "configure_logging": False,
                "include_dashboard": cluster["dashboard"],
                "_system_config": dict(EMBEDDED_SYSTEM_CONFIG)}  # a copy: ray.init adds to it
    gcs = cluster["address"] if cluster["address"] != "auto" else os.environ.get("RAY_ADDRESS", "")
    if re.fullmatch(r"[\w.\-]+:\d+", gcs):  # not ray:// (a client's cluster is the server's to know)
        env_vars["RAY_ADDRESS"] = gcs
    return {**kwargs, "address": cluster["address"]}


def require_embedded_cpus(cluster: dict, trial_cpus: float = 0.0) -> None:
    """An embedded Ray never grows: Ray Train would wait forever for a worker group (and a sweep's trial
    for itself, `trial_cpus`) larger than its CPUs."""
    fewest, per_worker = cluster["min_workers"] or cluster["num_workers"], cluster["cpus_per_worker"]
    cpus, needed = cluster["num_cpus"] or os.cpu_count(), fewest * per_worker + trial_cpus
    if needed > cpus:
        trial = f" plus sweep.trial_cpus={trial_cpus:g} for the trial" if trial_cpus else ""
        raise ConfigError(
            f"cluster.{'min' if cluster['min_workers'] else 'num'}_workers={fewest} workers of cluster.cpus_per_worker="
            f"{per_worker:g}{trial} need {needed:g} CPUs, more than the embedded Ray's cluster.num_cpus={cpus}: "
            "raise cluster.num_cpus (logical CPUs, may exceed the cores), ask for fewer, or join a cluster "
            "(cluster.address)"
        )


def connect(cluster: dict) -> None:
    if ray.is_initialized():
        return
    if not sys.stdout.isatty():
        # Ray colours the prefix of every worker line it forwards; in a file (`make run > log`, a
        # Ray job's or a Slurm job's output) the codes are noise. A user's RAY_COLOR_PREFIX stands.
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if cluster["address"] is not None:
        check_reachable(cluster["address"])
    # Ray announces that a cluster uses token authentication (its default, kept): news for whoever
    # runs the cluster, noise for a run that starts or joins one.
    with errors_only("ray._private.authentication.authentication_token_setup"):
        try:
            context = ray.init(**init_kwargs(cluster)) if cluster["address"] is not None else _start_embedded(cluster)
        except ConnectionError as e:
            raise _not_let_in(cluster["address"], e) from None
    if context.dashboard_url:
        print(f"[ray] dashboard: http://{context.dashboard_url}", flush=True)
    elif cluster["address"] is None:
        print("[ray] embedded instance without a dashboard (cluster.dashboard=true starts one)", flush=True)


TOKEN_FIX = ("a cluster with token authentication needs RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN, or "
             "~/.ray/auth_token) in this environment")


def _not_let_in(address: str, e: ConnectionError) -> Exception:
    """A cluster that answers (check_reachable saw to that) but would not take this driver: a Ray Client
    server that wants a token and gets none lets the client time out; a GCS refuses it, after Ray's own
    retries, which read alike to a port that is not a GCS's. Ray sends a token it finds here by itself
    only for `auto`; otherwise, without RAY_AUTH_MODE=token, a token is a likely want."""
    if address is None or address == "local":  # a Ray of this process's own that did not start
        return e
    if str(address).startswith("ray://") and "timeout" in str(e):
        return ClusterUnreachable(
            f"cluster.address={address}: the Ray Client server did not let this client in ({e}); {TOKEN_FIX}")
    if not str(address).startswith("ray://") and os.environ.get("RAY_AUTH_MODE") != "token" and not (
            address == "auto" and _token_here()):
        return ClusterUnreachable(f"cluster.address={address}: {str(e).splitlines()[0]}; if it is a Ray GCS, "
                                  f"{TOKEN_FIX}")
    return e


def _token_here() -> bool:
    try:
        return auth_token() is not None
    except SubmitError:  # a RAY_AUTH_TOKEN_PATH that names no token: none that Ray would find either
        return False


def capacity_note(cluster: dict, resources: dict) -> str | None:
    """For a cluster joined, with `resources` its totals (ray.cluster_resources()): a line when they are
    short of what the worker group asks, which Ray Train waits for without a word."""
    workers = cluster["min_workers"] or cluster["num_workers"]
    need = {"CPU": workers * cluster["cpus_per_worker"], **({"GPU": workers} if cluster["use_gpu"] else {})}
    short = [f"{need[k]:g} {k}s (it has {resources.get(k, 0):g})" for k in need if resources.get(k, 0) < need[k]]
    if not short:
        return None
    wait, tries = int(WORKER_ENV["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"]), CONTROLLER_RETRIES + 1
    return (f"[elmforge] {workers} worker(s) need {' and '.join(short)}: Ray Train waits up to {wait} s for them, "
            f"{tries} times ({wait * tries // 60} minutes; an autoscaling cluster adds nodes meanwhile), then fails; "
            "lower cluster.num_workers to start now")


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in one line when the cluster to join does not answer: Ray's own client retries a dead
    GCS for minutes, printing a warning every few seconds, and an http RAY_ADDRESS (the Jobs API's,
    set for `elmforge submit`) makes it refuse in five lines."""
    from ray._private.services import canonicalize_bootstrap_address, find_bootstrap_address

    # As ray.init reads it: RAY_ADDRESS stands in for `auto`, else `auto` is the last `ray start` here.
    env = os.environ.get("RAY_ADDRESS", "") if address == "auto" else ""
    source = (f", from RAY_ADDRESS={env}" if env else
              ", the last `ray start` on this machine" if address == "auto" else "")
    given = env or address
    if given.startswith(("http://", "https://")):  # the Jobs API's, for elmforge submit and jobs
        raise ClusterUnreachable(
            f"RAY_ADDRESS={env} is a Jobs API address (for elmforge submit and jobs), which cluster.address=auto "
            "cannot join: unset RAY_ADDRESS on a cluster node" if env else
            f"cluster.address={address} is a Jobs API address (that is submit.address): give auto, "
            "<head>:6379 or ray://<head>:10001")
    # `auto` is the last `ray start`'s cluster, as documented; Ray would also take any Ray it finds running
    # here (another user's test instance, say), or refuse in words about flags elmforge does not have.
    if address == "auto" and not env and find_bootstrap_address(None) is None:
        raise ClusterUnreachable(
            "cluster.address=auto: no Ray cluster was started on this machine (`ray start`) and RAY_ADDRESS is "
            "not set: start one (`ray start --head`), set RAY_ADDRESS=<head>:6379, or leave cluster.address "
            "unset for an embedded Ray")
    try:
        target = given.removeprefix("ray://") if given.startswith("ray://") else canonicalize_bootstrap_address(given)
    except (ConnectionError, ValueError) as e:  # no host:port
        raise ClusterUnreachable(f"cluster.address={address}: {str(e).splitlines()[0]}") from None
    if not target:  # "local": Ray starts an instance here
        return
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        raise ClusterUnreachable(
            f"cluster.address={address}: no Ray cluster answers at {target}{source} ({str(e.strerror or e).lower()}): "
            "start it (`ray start --head`) or correct the address, or leave cluster.address unset for an embedded Ray"
        ) from None


def _start_embedded(cluster: dict):
    # The GCS port is chosen here, before the start, so the workers can be told the address.
    for key, value in embedded_env(cluster).items():
        os.environ.setdefault(key, value)  # a user's own setting wins
    port = free_port("")
    previous = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        return ray.init(**init_kwargs(cluster, f"{ray.util.get_node_ip_address()}:{port}"))
    finally:
        if previous is None:
            del os.environ["RAY_GCS_SERVER_PORT"]
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = previous

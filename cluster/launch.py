"""Run the training loop on Ray Train workers: one TorchTrainer, cluster.num_workers ranks.

The loop itself (trainer.train_loop.train) knows nothing of Ray; this wrapper
gives it the rank environment DeepSpeed expects and reports its result back.
"""

import contextlib
import copy
import os
import signal
import threading
import uuid
from pathlib import Path

import ray.train
import torch
from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
from ray.train.torch import TorchConfig, TorchTrainer

from cluster.config import accumulation_for, elastic_note
from cluster.ray_runtime import CONTROLLER_RETRIES, capacity_note, connect
from trainer import host_memory
from trainer.distributed import PROCESS_GROUP_TIMEOUT
from trainer.errors import TrainingError, one_line
from trainer.preemption import clear_stop_request, request_stop
from trainer.summary import read_summary
from trainer.train_loop import check_start, check_storage_shared, train


def use_allotted_threads() -> None:
    """torch reads OMP_NUM_THREADS once, when first imported. Ray sets it in a worker (to the CPUs the
    worker was given, unless the user set it) only as the worker's task starts, so a worker process
    that had imported torch before (a setup hook, a runtime_env plugin) would run every core."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))


def _worker(config: dict) -> None:
    use_allotted_threads()
    ctx = ray.train.get_context()
    os.environ.update(
        RANK=str(ctx.get_world_rank()),
        WORLD_SIZE=str(ctx.get_world_size()),
        LOCAL_RANK=str(ctx.get_local_rank()),
        LOCAL_WORLD_SIZE=str(ctx.get_local_world_size()),
    )
    cfg = config["cfg"]
    if ctx.get_world_size() != cfg["cluster"]["num_workers"]:  # an elastic group, at another size
        cfg = copy.deepcopy(cfg)
        cfg["train"]["grad_accum_steps"] = accumulation_for(cfg, ctx.get_world_size())
    # Ray restarts the worker group after any error. A TrainingError (a divergence) would come back
    # from the same checkpoint, so its message is kept and every restart of this launch fails at once.
    check_storage_shared(cfg)
    gave_up = _gave_up_path(cfg, config["launch_id"])
    if gave_up.exists():
        raise TrainingError(f"not retried: {gave_up.read_text()}")
    try:
        # Validation results go to Ray (and so to Tune in a sweep). Train V2's report is a barrier:
        # every rank reports, at the same steps.
        train(cfg, report=ray.train.report)
    except TrainingError as e:
        rank = ctx.get_world_rank()
        tmp = gave_up.with_name(f"{gave_up.name}.{rank}")
        tmp.write_text(f"rank {rank}: {type(e).__name__}: {e}")
        tmp.replace(gave_up)  # whole, whichever rank writes it
        raise


def _gave_up_path(cfg: dict, launch_id: str) -> Path:
    return Path(cfg["run"]["dir"], f".gave_up-{launch_id}")


def scaling_config(cluster: dict) -> ScalingConfig:
    """cluster.num_workers ranks (elastic: min_workers to num_workers), each cpus_per_worker CPUs and,
    with use_gpu, one GPU."""
    resources = {"CPU": cluster["cpus_per_worker"]}
    if cluster["use_gpu"]:
        resources["GPU"] = 1
    workers = cluster["num_workers"]
    if cluster["min_workers"] is not None and cluster["min_workers"] < workers:
        workers = (cluster["min_workers"], workers)
    return ScalingConfig(num_workers=workers, use_gpu=cluster["use_gpu"], resources_per_worker=resources)


def torch_backend(cluster: dict) -> str:
    return "nccl" if cluster["use_gpu"] else "gloo"


def run_config(cfg: dict, callbacks: list | None = None) -> RunConfig:
    """After a worker dies Ray restarts the group up to max_failures times; train() resumes from the
    newest complete checkpoint in run.dir, which the trainer owns (Ray keeps no copy)."""
    return RunConfig(
        name=cfg["run"]["name"],
        storage_path=os.path.join(cfg["run"]["dir"], "ray"),
        failure_config=FailureConfig(max_failures=cfg["cluster"]["max_failures"],
                                     controller_failure_limit=CONTROLLER_RETRIES),
        callbacks=callbacks,
        # glibc reads these at the worker's start; the loop's thread has its own heap by train(). Not on
        # GPUs: the step's large tensors are on the device, and one arena would serialise the host
        # threads that allocate (NCCL's, the loader's, an offloaded optimizer's).
        worker_runtime_env={"env_vars": {} if cfg["cluster"]["use_gpu"] else host_memory.worker_env()},
    )


class _Trainer(TorchTrainer):
    """Ray Train's fit() answers Ctrl-C by aborting the worker group, losing the steps since the last
    checkpoint; the driver's own handler (stop_signals_forwarded) asks the workers to checkpoint instead."""

    def _register_sigint_handler(self, controller) -> None:
        pass


def torch_trainer(cfg: dict, callbacks: list | None = None, launch_id: str | None = None) -> TorchTrainer:
    """The Ray Train trainer that runs the training loop on cluster.num_workers ranks."""
    return _Trainer(
        _worker,
        train_loop_config={"cfg": cfg, "launch_id": launch_id or uuid.uuid4().hex[:12]},
        scaling_config=scaling_config(cfg["cluster"]),
        torch_config=TorchConfig(backend=torch_backend(cfg["cluster"]),
                                 timeout_s=int(PROCESS_GROUP_TIMEOUT.total_seconds())),
        run_config=run_config(cfg, callbacks),
    )


@contextlib.contextmanager
def stop_signals_forwarded(run_dir: str):
    """While it lasts, SIGTERM to the driver (a preempted Slurm job, a deleted pod) or Ctrl-C asks the workers
    to checkpoint and stop, also while they start; Ctrl-C a second time quits at once. Then the handlers
    before it (Ray's) are back: a later Ctrl-C in the same process interrupts it."""
    asked = set()

    def handle(signum, frame):
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and signum in asked:
            raise KeyboardInterrupt
        asked.add(signum)
        again = " (Ctrl-C again quits at once, losing the steps since the last checkpoint)" * (signum == signal.SIGINT)
        print(f"[elmforge] {name}: asking the workers to checkpoint and stop{again}", flush=True)
        request_stop(run_dir, f"{name} to the driver")

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    previous = {signum: signal.signal(signum, handle) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def launch_training(cfg: dict) -> dict:
    """Train under Ray Train; returns the run summary rank 0 wrote (run.dir/summary.json)."""
    cluster = cfg["cluster"]
    check_start(cfg)  # before Ray starts: one clear line instead of every worker's traceback
    if note := elastic_note(cfg):
        print(note, flush=True)
    clear_stop_request(cfg["run"]["dir"])
    connect(cluster)
    if cluster["address"] is not None and (note := capacity_note(cluster, ray.cluster_resources())):
        print(note, flush=True)  # an embedded Ray was checked before it started (require_embedded_cpus)
    Path(cfg["run"]["dir"]).mkdir(parents=True, exist_ok=True)
    workers = f"{cluster['min_workers']}-{cluster['num_workers']}" if cluster["min_workers"] else cluster["num_workers"]
    launch_id = uuid.uuid4().hex[:12]
    try:
        with stop_signals_forwarded(cfg["run"]["dir"]):  # after ray.init, which installs its own; a request now stands
            print(f"[elmforge] {cfg['run']['name']}: starting {workers} Ray Train worker(s)", flush=True)
            torch_trainer(cfg, launch_id=launch_id).fit()
    except TrainingFailedError as e:
        gave_up = _gave_up_path(cfg, launch_id)
        if gave_up.exists():  # the first failure is the one to report, not the restarts' "not retried"
            message = gave_up.read_text()
            gave_up.unlink()
            raise TrainingError(f"training failed ({message}); not retried: a restart from the last checkpoint "
                                f"would fail the same way") from e
        raise TrainingError(f"training failed ({worker_errors(e)}); {cluster['max_failures']} restart(s) "
                            f"from the last checkpoint were allowed (cluster.max_failures)") from e
    return read_summary(cfg["run"]["dir"])


def worker_errors(error: Exception) -> str:
    """Each failed rank's error, first line only: the full tracebacks are in the log above."""
    failures = getattr(error, "worker_failures", None) or {}
    if not failures:
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return "; ".join(f"rank {rank}: {_first_line(e)}" for rank, e in sorted(failures.items()))


def _first_line(error: Exception) -> str:
    return one_line(getattr(error, "cause", None) or error)  # a RayTaskError wraps the worker's own exception

"""How a config becomes a Ray connection, a worker group and a process-group backend."""

import logging
from pathlib import Path

import pytest
import torch

from cluster.config import accumulation_for, compose_config, elastic_note
from cluster.launch import run_config, scaling_config, torch_backend
from cluster.ray_runtime import embedded_env, init_kwargs, require_embedded_cpus


def test_embedded_ray_gets_logical_cpus_and_the_cpu_backend():
    cluster = compose_config([])["cluster"]
    kwargs = init_kwargs(cluster)
    assert kwargs["num_cpus"] == 4 and kwargs["address"] == "local"
    assert kwargs["include_dashboard"] is False  # on request only: cluster.dashboard=true
    assert kwargs["runtime_env"]["worker_process_setup_hook"] == "cluster.ray_worker_setup.quiet_placement_group_cleaner"
    with_dashboard = init_kwargs(compose_config(["cluster.dashboard=true"])["cluster"])
    assert with_dashboard["include_dashboard"] is True
    assert with_dashboard["runtime_env"]["worker_process_setup_hook"] == "cluster.ray_worker_setup.quiet_train_controller"
    assert kwargs["runtime_env"]["env_vars"]["DS_ACCELERATOR"] == "cpu"
    assert torch_backend(cluster) == "gloo"
    # One node that ends with the run: no workers prestarted for later jobs, no drain watcher, and
    # Ray Train's metrics only for a dashboard to show.
    assert kwargs["_system_config"] == {"enable_worker_prestart": False, "prestart_worker_first_driver": False}
    assert embedded_env(cluster) == {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0"}
    assert embedded_env(compose_config(["cluster.dashboard=true"])["cluster"]) == {
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


@pytest.mark.parametrize("address", ["auto", "ray://head.example:10001"])
def test_an_existing_cluster_is_joined_as_is(address):
    kwargs = init_kwargs(compose_config([f"cluster.address={address}"])["cluster"])
    assert kwargs["address"] == address and "num_cpus" not in kwargs and "include_dashboard" not in kwargs
    assert "_system_config" not in kwargs  # a cluster's own settings stand
    assert kwargs["runtime_env"]["worker_process_setup_hook"] == "cluster.ray_worker_setup.quiet_train_controller"


def test_the_controllers_routine_messages_are_dropped_and_the_rest_kept():
    from cluster.ray_worker_setup import CALLBACK, ELASTIC, quiet_train_controller, report_logger
    from ray.train.v2._internal.execution import context

    quiet_train_controller()

    def shown(logger: str, message: str) -> bool:
        record = logging.LogRecord(logger, logging.ERROR, __file__, 1, message, None, None)
        return bool(logging.getLogger(logger).filter(record))

    assert not shown(CALLBACK, "Failed to stop PlacementGroupCleaner gracefully.")
    assert shown(CALLBACK, "Failed to register placement group with cleaner: boom")
    assert not shown(ELASTIC, "Did not detect any changes in the cluster resources. Training will continue ...")
    assert shown(ELASTIC, "Detected changes in the cluster resources. Deciding to resize the worker group from 1 -> 2")
    assert report_logger() == context.logger.name  # the module names its logger by its file
    assert not shown(report_logger(), "Reporting training result 1: TrainingReport(checkpoint=None, ...")


def test_use_gpu_selects_nccl_one_gpu_per_worker_and_the_cuda_accelerator():
    cluster = compose_config(["cluster.use_gpu=true", "cluster.num_workers=8", "cluster.cpus_per_worker=6"])["cluster"]
    scaling = scaling_config(cluster)
    assert scaling.num_workers == 8 and scaling.use_gpu
    assert scaling.resources_per_worker == {"CPU": 6, "GPU": 1}
    assert torch_backend(cluster) == "nccl"
    assert init_kwargs(cluster)["runtime_env"]["env_vars"]["DS_ACCELERATOR"] == "cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without GPUs shows the refusal")
@pytest.mark.parametrize("argv, needs", [
    (["train", "cluster.use_gpu=true", "cluster.num_workers=2"], "needs 2 GPUs on this machine (one per worker)"),
    (["train", "cluster.use_gpu=true", "cluster.launcher=local", "cluster.num_workers=1"],
     "needs 1 GPU here (local rank 0)"),
])
def test_use_gpu_without_a_gpu_fails_at_once_in_one_line(argv, needs, tmp_path, capsys):
    from cluster.cli import main

    # Before anything else starts: an embedded Ray would wait forever for GPUs, and nothing is prepared.
    assert main([*argv, f"storage_path={tmp_path}", "logger=none"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "set ELMFORGE_DEBUG=1" in err, err
    assert f"cluster.use_gpu=true {needs}, but this torch (" in err and "set cluster.use_gpu=false" in err, err
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("overrides, message", [
    (["cluster.num_workers=5"], "cluster.num_workers=5 workers of cluster.cpus_per_worker=1 need 5 CPUs, more than "
                                "the embedded Ray's cluster.num_cpus=4: raise cluster.num_cpus"),
    (["cluster.min_workers=2", "cluster.cpus_per_worker=3"], "cluster.min_workers=2 workers of cluster.cpus_per_worker=3 "
                                                             "need 6 CPUs, more than the embedded Ray's cluster.num_cpus=4"),
])
def test_a_worker_group_the_embedded_ray_cannot_hold_fails_at_once_in_one_line(overrides, message, tmp_path, capsys):
    from cluster.cli import main

    # Ray Train would wait for the CPUs forever, a Ctrl-C's request to checkpoint with it.
    assert main(["train", *overrides, f"storage_path={tmp_path}", "logger=none"]) == 2  # a config error
    assert f"elmforge train: config error\n{message}" in capsys.readouterr().err
    assert not (tmp_path / "data").exists() and not (tmp_path / "outputs").exists()
    # What fits: the group's floor (elastic), more logical CPUs; a cluster to join may grow (not checked).
    require_embedded_cpus(compose_config(["cluster.min_workers=1", "cluster.cpus_per_worker=3"])["cluster"])
    require_embedded_cpus(compose_config(["cluster.num_workers=5", "cluster.num_cpus=5"])["cluster"])


def test_a_joined_cluster_short_of_what_the_group_asks_is_named_before_ray_train_waits():
    from cluster.ray_runtime import capacity_note

    cluster = compose_config(["cluster.address=auto", "cluster.num_workers=6", "cluster.use_gpu=true"])["cluster"]
    assert capacity_note(cluster, {"CPU": 4.0, "GPU": 8.0}) == (
        "[elmforge] 6 worker(s) need 6 CPUs (it has 4): Ray Train waits up to 300 s for them, 4 times (20 minutes; an "
        "autoscaling cluster adds nodes meanwhile), then fails; lower cluster.num_workers to start now")
    assert "need 6 CPUs (it has 0) and 6 GPUs (it has 2)" in capacity_note(cluster, {"GPU": 2.0})
    assert capacity_note(cluster, {"CPU": 6.0, "GPU": 6.0}) is None
    elastic = {**cluster, "min_workers": 2}  # the group starts with its floor
    assert capacity_note(elastic, {"CPU": 2.0, "GPU": 2.0}) is None


def test_min_workers_makes_the_group_elastic_with_the_samples_per_step_kept():
    cfg = compose_config(["cluster.num_workers=4", "cluster.min_workers=2", "train.grad_accum_steps=3"])
    assert scaling_config(cfg["cluster"]).num_workers == (2, 4)
    assert [accumulation_for(cfg, w) for w in (4, 2)] == [3, 6]
    assert scaling_config(compose_config([])["cluster"]).num_workers == 2  # fixed by default
    assert elastic_note(cfg) is None  # 4 x 3 micro-batches share among 2, 3 and 4


def test_an_elastic_group_at_a_size_that_cannot_share_the_batch_is_named_and_stops():
    cfg = compose_config(["cluster.num_workers=4", "cluster.min_workers=2"])  # 4 micro-batches of 8 per step
    assert "do not divide among 3; a group Ray starts at such a size stops at once" in elastic_note(cfg)
    with pytest.raises(ValueError, match="Ray started 3 workers, and 32 samples per step .* do not divide among them"):
        accumulation_for(cfg, 3)
    assert accumulation_for(cfg, 2) == 2


def test_cpu_workers_reserve_only_cpus():
    scaling = scaling_config(compose_config(["cluster.cpus_per_worker=0.5"])["cluster"])
    assert scaling.resources_per_worker == {"CPU": 0.5} and not scaling.use_gpu


def test_no_secret_travels_in_the_runtime_env(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "planted-secret-0123456789")
    env = init_kwargs(compose_config([])["cluster"])["runtime_env"]
    assert "planted-secret" not in repr(env)


def test_failures_allowed_and_storage_follow_the_run(tmp_path):
    cfg = compose_config([f"storage_path={tmp_path}", "cluster.max_failures=2", "run.name=r"])
    rc = run_config(cfg)
    assert rc.failure_config.max_failures == 2
    assert rc.storage_path == str(tmp_path / "outputs/r/ray") and rc.name == "r"


def test_workers_are_told_where_the_cluster_is(monkeypatch):
    # Ray's own lookup would read /tmp/ray/ray_current_cluster, written only by `ray start`.
    embedded = init_kwargs(compose_config([])["cluster"], "10.0.0.7:41234")
    assert embedded["runtime_env"]["env_vars"]["RAY_ADDRESS"] == "10.0.0.7:41234"
    # A joined cluster's GCS too, where it is known here (with a second Ray on a node, the file names the newer).
    joined = init_kwargs(compose_config(["cluster.address=10.0.0.8:6379"])["cluster"])
    assert joined["runtime_env"]["env_vars"]["RAY_ADDRESS"] == "10.0.0.8:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")  # as Ray sets it for a job's entrypoint
    in_a_job = init_kwargs(compose_config(["cluster.address=auto"])["cluster"])
    assert in_a_job["runtime_env"]["env_vars"]["RAY_ADDRESS"] == "10.0.0.9:6379"
    client = init_kwargs(compose_config(["cluster.address=ray://head:10001"])["cluster"])
    assert "RAY_ADDRESS" not in client["runtime_env"]["env_vars"]


def test_a_submitted_job_carries_the_working_directory_without_data_outputs_or_venv(tmp_path, monkeypatch):
    from cluster.submit import runtime_env

    monkeypatch.chdir(tmp_path)
    env = runtime_env(compose_config([])["submit"])
    assert env["working_dir"] == str(tmp_path)
    assert {"/data", "/outputs", "/sweeps", "/report", "/.venv"} <= set(env["excludes"]) and "env_vars" not in env


def test_stop_signals_ask_the_workers_to_stop_while_training_and_the_handlers_before_come_back(tmp_path, capsys):
    import os
    import signal

    from cluster.launch import stop_signals_forwarded
    from trainer.preemption import STOP_FILE

    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    with stop_signals_forwarded(str(tmp_path)):
        os.kill(os.getpid(), signal.SIGTERM)
        assert (tmp_path / STOP_FILE).read_text() == "elmforge stop: SIGTERM to the driver\n"
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C asks too; the second quits at once
        assert "Ctrl-C again quits at once" in capsys.readouterr().out
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert {signum: signal.getsignal(signum) for signum in before} == before


def _storage_check(cfg: dict, hidden_from_rank: int) -> str:
    import torch.distributed as dist

    from trainer.distributed import init_distributed
    from trainer.train_loop import check_storage_shared

    init_distributed(use_gpu=False)
    if dist.get_rank() == hidden_from_rank:  # as on a node that does not mount storage_path
        cfg = {**cfg, "run": {**cfg["run"], "dir": cfg["run"]["dir"] + "-elsewhere"}}
    try:
        check_storage_shared(cfg)
    except FileNotFoundError as e:
        return str(e)
    return "ok"


def test_a_rank_on_a_node_without_the_shared_storage_stops_every_rank_naming_it(tmp_path):
    # The launcher makes run.dir before any rank starts; a rank that cannot see it is on a node that does not
    # mount storage_path (else it would report the data as not prepared, or lose its checkpoints), and the
    # others stop too, rather than waiting for it in their first collective.
    import socket

    from distributed import run_ranks

    cfg = compose_config([f"storage_path={tmp_path}"])
    Path(cfg["run"]["dir"]).mkdir(parents=True)
    assert run_ranks(2, _storage_check, cfg, -1) == ["ok", "ok"]
    fix = f"storage_path ({tmp_path}) must be a file system every node mounts at the same path (docs/cluster.md)"
    assert run_ranks(2, _storage_check, cfg, 1) == [
        f"run.dir {cfg['run']['dir']} is not there for 1 of 2 ranks, on other nodes: {fix}",
        f"run.dir {cfg['run']['dir']}-elsewhere is not there on node {socket.gethostname()}, though the launcher "
        f"made it: {fix}",
    ]


def _process_group_timeout() -> float:
    import torch.distributed as dist

    from trainer.distributed import init_distributed

    init_distributed(use_gpu=False)
    return dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu")).options._timeout.total_seconds()


def test_ranks_wait_an_hour_in_a_collective_while_rank_0_works_alone():
    # Rank 0 alone prepares the data (torchrun) or converts a checkpoint for another world size while the
    # others wait in a collective: torch's 10 (NCCL) or 30 (gloo, Ray Train) minutes would end them first.
    from distributed import run_ranks

    from cluster.launch import torch_trainer

    assert run_ranks(1, _process_group_timeout) == [3600.0]
    cfg = compose_config([])
    assert torch_trainer(cfg).backend_config.timeout_s == 3600

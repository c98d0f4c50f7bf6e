"""Run the training loop on Ray Train workers: one TorchTrainer, cluster.num_workers ranks.

The loop itself (trainer.train_loop.train) knows nothing of Ray; this wrapper
gives it the rank environment DeepSpeed expects and reports its result back.
"""

import os

import ray.train
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from cluster.ray_runtime import connect
from trainer.summary import read_summary


def _worker(config: dict) -> None:
    ctx = ray.train.get_context()
    os.environ.update(
        RANK=str(ctx.get_world_rank()),
        WORLD_SIZE=str(ctx.get_world_size()),
        LOCAL_RANK=str(ctx.get_local_rank()),
        LOCAL_WORLD_SIZE=str(ctx.get_local_world_size()),
    )
    from trainer.train_loop import train

    result = train(config["cfg"])
    # Train V2: report is a barrier, so every rank reports.
    ray.train.report({"final_loss": result["final_loss"]})


def scaling_config(cluster: dict) -> ScalingConfig:
    """cluster.num_workers ranks, each cpus_per_worker CPUs and, with use_gpu, one GPU."""
    resources = {"CPU": cluster["cpus_per_worker"]}
    if cluster["use_gpu"]:
        resources["GPU"] = 1
    return ScalingConfig(num_workers=cluster["num_workers"], use_gpu=cluster["use_gpu"], resources_per_worker=resources)


def torch_backend(cluster: dict) -> str:
    return "nccl" if cluster["use_gpu"] else "gloo"


def run_config(cfg: dict) -> RunConfig:
    """After a worker dies Ray restarts the group up to max_failures times; train() resumes from the
    newest complete checkpoint in run.dir, which the trainer owns (Ray keeps no copy)."""
    return RunConfig(
        name=cfg["run"]["name"],
        storage_path=os.path.join(cfg["run"]["dir"], "ray"),
        failure_config=FailureConfig(max_failures=cfg["cluster"]["max_failures"]),
    )


def launch_training(cfg: dict) -> dict:
    """Train under Ray Train; returns the run summary rank 0 wrote (run.dir/summary.json)."""
    cluster = cfg["cluster"]
    connect(cluster)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": cfg},
        scaling_config=scaling_config(cluster),
        torch_config=TorchConfig(backend=torch_backend(cluster)),
        run_config=run_config(cfg),
    )
    trainer.fit()
    return read_summary(cfg["run"]["dir"])

"""Run the training loop on Ray Train workers: one TorchTrainer, cluster.num_workers ranks.

The loop itself (trainer.train_loop.train) knows nothing of Ray; this wrapper
gives it the rank environment DeepSpeed expects and reports its result back.
"""

import os

import ray.train
from ray.train import RunConfig, ScalingConfig
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
    resources = {"CPU": cluster["cpus_per_worker"]}
    if cluster["use_gpu"]:
        resources["GPU"] = 1
    return ScalingConfig(num_workers=cluster["num_workers"], use_gpu=cluster["use_gpu"], resources_per_worker=resources)


def launch_training(cfg: dict) -> dict:
    """Train under Ray Train; returns the run summary rank 0 wrote (run.dir/summary.json)."""
    cluster = cfg["cluster"]
    connect(cluster)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": cfg},
        scaling_config=scaling_config(cluster),
        torch_config=TorchConfig(backend="nccl" if cluster["use_gpu"] else "gloo"),
        run_config=RunConfig(name=cfg["run"]["name"], storage_path=os.path.join(cfg["run"]["dir"], "ray")),
    )
    trainer.fit()
    return read_summary(cfg["run"]["dir"])

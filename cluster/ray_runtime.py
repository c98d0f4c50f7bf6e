"""Connect to Ray: an embedded instance on this machine, or an existing cluster.

cluster.address null starts Ray here with cluster.num_cpus logical CPUs (more
than the physical cores, so a 2-core laptop can schedule 2 workers); `auto` or
`ray://host:10001` joins a running cluster, which brings its own resources.
"""

import os

import ray

# Workers import deepspeed; this picks its CPU backend unless a GPU run overrides it.
# Ray Train's print patch sends each line through logging too, printing it twice.
WORKER_ENV = {"DS_ACCELERATOR": "cpu", "WANDB_SILENT": "true", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def connect(cluster: dict) -> None:
    if ray.is_initialized():
        return
    env_vars = {k: os.environ.get(k, v) for k, v in WORKER_ENV.items()}
    if cluster["use_gpu"]:
        env_vars["DS_ACCELERATOR"] = "cuda"
    runtime_env = {"env_vars": env_vars}
    if cluster["address"] is None:
        context = ray.init(num_cpus=cluster["num_cpus"], runtime_env=runtime_env, configure_logging=False)
    else:
        context = ray.init(address=cluster["address"], runtime_env=runtime_env)
    if context.dashboard_url:
        print(f"[ray] dashboard: http://{context.dashboard_url}", flush=True)

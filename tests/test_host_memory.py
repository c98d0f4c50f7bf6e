"""Freed host memory is reused from step to step, not faulted in again: by keep_freed_memory() on the
main thread, and by the environment Ray workers get on a thread of their own (Ray Train's loop
thread); release_freed_memory() hands it back."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import compose_config
from cluster.launch import run_config
from trainer.host_memory import ENV

ROOT = Path(__file__).resolve().parent.parent

# Page faults of a typical training step (the median of steps 3-12: while the heap settles, over
# the first twenty-odd steps, an occasional step still grows it by a block) of a model whose
# logits and their gradient (512 tokens x 32,000, 65 MB each) are past glibc's mmap threshold, on
# the main thread or on a new one (as under Ray Train), with or without keep_freed_memory(); then
# the process's resident size before and after release_freed_memory().
PROBE = """
import json, resource, statistics, sys, threading
import torch
sys.path.insert(0, {root!r})
from trainer.host_memory import keep_freed_memory, release_freed_memory
from trainer.loss import lm_loss
from trainer.model import OpenELMConfig, build_model

torch.set_num_threads(1)
applied = keep_freed_memory() if {call} else None
cfg = OpenELMConfig(num_layers=1, model_dim=64, head_dim=16, num_gqa_groups=1, qkv_multipliers=[1.0, 1.0],
                    ffn_multipliers=[1.0, 1.0], ffn_dim_divisor=16, vocab_size=32000, max_context_length=256)
model = build_model(cfg, seed=0)
optimizer = torch.optim.AdamW(model.parameters(), fused=True)
tokens = torch.randint(0, cfg.vocab_size, (2, 257), generator=torch.Generator().manual_seed(0))

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

def train(out):
    faults = []
    for _ in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        optimizer.zero_grad(set_to_none=True)
        lm_loss(model(tokens[:, :-1]), tokens[:, 1:], 1e-4)[0].backward()
        optimizer.step()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    out["faults"] = statistics.median(faults[2:])
    out["rss_mb"] = rss_mb()
    release_freed_memory()
    out["rss_mb_released"] = rss_mb()

out = {{"applied": applied}}
if {thread}:
    t = threading.Thread(target=train, args=(out,))
    t.start()
    t.join()
else:
    train(out)
print(json.dumps(out))
"""
LOGITS_PAGES = 2 * 256 * 32000 * 4 // 4096  # one (2, 256, 32000) fp32 tensor


def probe(call: bool, thread: bool, env: dict) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ENV}
    code = PROBE.format(root=str(ROOT), call=call, thread=thread)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**base, **env}, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_training_steps_reuse_freed_memory_and_release_hands_it_back():
    plain = probe(call=False, thread=False, env={})
    assert plain["faults"] > LOGITS_PAGES, plain  # glibc unmapped the logits and their gradient: faulted again
    kept = probe(call=True, thread=False, env={})
    assert kept["applied"] is True
    assert kept["faults"] < LOGITS_PAGES // 10, kept
    assert kept["rss_mb_released"] < kept["rss_mb"] - 50, kept


def worker_env_vars(*overrides: str) -> dict:
    cfg = compose_config(["run.name=m", "storage_path=/tmp/elmforge-host-memory", *overrides])
    return run_config(cfg).worker_runtime_env["env_vars"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_the_ray_worker_environment_keeps_memory_on_another_thread():
    plain = probe(call=False, thread=True, env={})
    assert plain["faults"] > LOGITS_PAGES, plain
    kept = probe(call=True, thread=True, env=worker_env_vars())
    assert kept["applied"] is False  # glibc took them from the environment; the call leaves them be
    assert kept["faults"] < LOGITS_PAGES // 10, kept


def test_a_users_own_malloc_environment_wins(monkeypatch):
    assert worker_env_vars() == ENV
    assert worker_env_vars("cluster.use_gpu=true") == {}  # GPU workers: the step's tensors are on the device
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")  # the workers inherit it; none of ours is added
    assert worker_env_vars() == {}
    assert probe(call=True, thread=False, env={"MALLOC_ARENA_MAX": "4"})["applied"] is False


@pytest.mark.integration
def test_ray_train_workers_start_with_the_settings_and_nothing_else_does(tmp_path):
    """Only the training workers: Ray Data's tokenizer actors run many allocating threads, which one
    arena would serialise."""
    import ray
    from ray.train.torch import TorchTrainer

    from cluster.launch import scaling_config
    from cluster.ray_runtime import connect

    def read_env(config):
        Path(config["out"], f"rank{ray.train.get_context().get_world_rank()}.json").write_text(
            json.dumps({k: os.environ.get(k) for k in ENV}))

    @ray.remote
    def other_task():
        return {k: os.environ.get(k) for k in ENV}

    cfg = compose_config([f"storage_path={tmp_path}", "run.name=env", "cluster.num_workers=2"])
    connect(cfg["cluster"])
    try:
        TorchTrainer(read_env, train_loop_config={"out": str(tmp_path)}, scaling_config=scaling_config(cfg["cluster"]),
                     run_config=run_config(cfg)).fit()
        assert ray.get(other_task.remote()) == {k: None for k in ENV}
        logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    finally:
        ray.shutdown()
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == ENV
    # The embedded instance started no process it had no use for (cluster/ray_runtime.py): every Python
    # worker it started belongs to this job (none prestarted), and Ray Train watched no node for draining.
    started = {f: f.read_text() for f in logs.glob("worker-*.out")}
    assert sum(":actor_name:RayTrainWorker" in text for text in started.values()) == 2
    assert not [f.name for f, text in started.items() if ":actor_name:PreemptionWatcher" in text]
    assert not [f.name for f in started if "-ffffffff-" in f.name], sorted(f.name for f in started)

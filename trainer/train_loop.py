"""The training loop: OpenELM + DeepSpeed ZeRO on prepared shards. Imports no Ray.

Runs the same in one process, under torchrun, or inside a Ray Train worker
(cluster/launch.py): every rank calls train(cfg) with the finalised config.
"""

import time

import torch

from data_pipelines.loader import TokenLoader
from data_pipelines.manifest import read_manifest
from trainer.checkpoint import save_checkpoint
from trainer.deepspeed_config import deepspeed_config
from trainer.distributed import DistEnv, init_distributed, mean_across_ranks
from trainer.loss import lm_loss
from trainer.metrics import MetricsLogger
from trainer.model import OpenELMConfig, build_model
from trainer.summary import write_summary
from trainer.optim import param_groups, warmup_cosine_scheduler


def _check_data(cfg: dict, manifest) -> None:
    vocab = cfg["model"]["vocab_size"]
    if manifest.vocab_size > vocab:
        raise ValueError(
            f"{manifest.root}: tokenizer vocabulary {manifest.vocab_size} exceeds model.vocab_size={vocab}"
        )
    if manifest.seq_len > cfg["model"]["rope_max_length"]:
        raise ValueError(f"{manifest.root}: seq_len {manifest.seq_len} exceeds model.rope_max_length")


def _progress_line(step: int, max_steps: int, rec: dict, elapsed: float) -> str:
    eta = elapsed / step * (max_steps - step)
    return (
        f"[train] step {step}/{max_steps} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
        f"grad_norm {rec['grad_norm']:.3f} | {rec['tokens_per_s']:,.0f} tok/s | ETA {eta:.0f}s"
    )


def build_engine(cfg: dict, model: torch.nn.Module, env: DistEnv):
    """The DeepSpeed engine (ZeRO, AdamW, clipping, precision) and its lr scheduler."""
    import deepspeed  # after init_distributed has chosen the accelerator

    t_cfg = cfg["train"]
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, t_cfg["weight_decay"]),
        config=deepspeed_config(t_cfg, cfg["deepspeed"], env.world_size, cfg["cluster"]["use_gpu"]),
        lr_scheduler=lambda opt: warmup_cosine_scheduler(opt, t_cfg),
    )
    return engine, scheduler


def train(cfg: dict) -> dict:
    t_cfg = cfg["train"]
    env = init_distributed(cfg["cluster"]["use_gpu"])
    manifest = read_manifest(cfg["data"]["dir"])
    _check_data(cfg, manifest)
    model = build_model(OpenELMConfig(**cfg["model"]), seed=t_cfg["seed"]).to(env.device)
    num_params = model.num_params()  # before ZeRO-3 partitions the parameters away
    engine, scheduler = build_engine(cfg, model, env)
    loader = TokenLoader(
        manifest.root,
        "train",
        env.rank,
        env.world_size,
        t_cfg["micro_batch_size"],
        t_cfg["seed"],
        num_workers=t_cfg["loader_workers"],
    )
    metrics = MetricsLogger(cfg["run"]["dir"], cfg, enabled=env.is_main)
    if env.is_main:
        print(
            f"[train] {cfg['run']['name']}: {num_params:,} parameters, {env.world_size} ranks, "
            f"ZeRO-{cfg['deepspeed']['stage']}, {t_cfg['precision']}, {t_cfg['max_steps']} steps",
            flush=True,
        )

    tokens_per_step = t_cfg["micro_batch_size"] * t_cfg["grad_accum_steps"] * env.world_size * manifest.seq_len
    start = time.perf_counter()
    losses = []
    for step in range(1, t_cfg["max_steps"] + 1):
        step_start = time.perf_counter()
        lr = scheduler.get_last_lr()[0]
        total = torch.zeros((), device=env.device)
        ce_total = torch.zeros((), device=env.device)
        for _ in range(t_cfg["grad_accum_steps"]):
            batch = next(loader).to(env.device, non_blocking=True)
            logits = engine(batch[:, :-1])
            loss, ce = lm_loss(logits, batch[:, 1:], t_cfg["z_loss_weight"])
            engine.backward(loss)
            engine.step()
            total += loss.detach()
            ce_total += ce.detach()
        loss_value = mean_across_ranks(total / t_cfg["grad_accum_steps"])
        step_time = time.perf_counter() - step_start
        record = {
            "loss": loss_value,
            "ce_loss": mean_across_ranks(ce_total / t_cfg["grad_accum_steps"]),
            "lr": lr,
            "grad_norm": float(engine.get_global_grad_norm() or 0.0),
            "tokens_per_s": tokens_per_step / step_time,
            "step_time_s": step_time,
            "tokens": step * tokens_per_step,
        }
        losses.append(loss_value)
        metrics.log(step, record)
        if env.is_main and (step % t_cfg["log_every"] == 0 or step == t_cfg["max_steps"]):
            print(_progress_line(step, t_cfg["max_steps"], record, time.perf_counter() - start), flush=True)

    checkpoint = save_checkpoint(
        engine,
        f"{cfg['run']['dir']}/checkpoints",
        t_cfg["max_steps"],
        {"step": t_cfg["max_steps"], "loader": loader.state_dict(), "config": cfg},
        env.is_main,
    )
    summary = {
        "run_name": cfg["run"]["name"],
        "steps": t_cfg["max_steps"],
        "final_loss": losses[-1],
        "losses": losses,
        "num_params": num_params,
        "data_dir": str(manifest.root),
        "checkpoint": str(checkpoint),
        "metrics": str(metrics.path),
        "wandb_dir": str(metrics.wandb_dir) if metrics.wandb_dir else None,
    }
    metrics.summary({"final_loss": losses[-1]})
    metrics.close()
    if env.is_main:
        write_summary(cfg["run"]["dir"], summary)
    return summary

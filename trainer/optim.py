"""AdamW parameter groups and the warmup-cosine learning-rate schedule of the OpenELM recipe."""

import math
from contextlib import contextmanager

import torch
from torch import nn


def decayed(param: torch.Tensor) -> bool:
    """Matrices (embeddings included) decay; 1-D parameters (norm weights) never do."""
    return param.ndim >= 2


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The decayed parameters, then the others, each in the model's order."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if decayed(p)], "weight_decay": weight_decay},
        {"params": [p for p in params if not decayed(p)], "weight_decay": 0.0},
    ]


def warmup_cosine_lr(step: int, max_lr: float, init_lr: float, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """lr for optimizer step `step` (0-based): linear from init_lr to max_lr, then cosine to min_ratio * max_lr."""
    if step < warmup_steps:
        return init_lr + (max_lr - init_lr) * step / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    min_lr = min_ratio * max_lr
    return min_lr + (max_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, train_cfg: dict) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over the optimizer's base lr (= train.lr); DeepSpeed steps it once per optimizer step."""
    t = train_cfg

    def factor(step: int) -> float:
        lr = warmup_cosine_lr(step, t["lr"], t["warmup_init_lr"], t["warmup_steps"], t["max_steps"], t["min_lr_ratio"])
        return lr / t["lr"]

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def rewind_one_step(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Undo a scheduler step taken for an update that was skipped, as DeepSpeed does for ZeRO 1-3."""
    scheduler.last_epoch -= 1
    _set_lrs(scheduler)


@contextmanager
def keeping_configured_hyperparameters(optimizer: torch.optim.Optimizer):
    """Loading a checkpoint puts back the AdamW betas, eps and weight decay it was saved with (DeepSpeed's
    universal loader even gives every group the first group's); a run resumed with other values on
    purpose trains with the configured ones, which unchanged are the same values."""
    configured = [{k: group[k] for k in ("betas", "eps", "weight_decay")} for group in optimizer.param_groups]
    yield
    for group, values in zip(optimizer.param_groups, configured, strict=True):
        group.update(values)


def follow_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float) -> None:
    """After loading a checkpoint: its lr is the schedule it was saved with, at its step; with train.lr,
    max_steps or warmup changed since (a run extended on purpose), the next step takes this schedule's.
    Unchanged, the values are the same ones (an exact resume stays bitwise)."""
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    _set_lrs(scheduler)


def _set_lrs(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    for group, base_lr, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]

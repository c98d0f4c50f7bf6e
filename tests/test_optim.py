import math

import pytest
import torch

from trainer.deepspeed_config import deepspeed_config
from trainer.model import OpenELMConfig, build_model
from trainer.optim import param_groups, rewind_one_step, warmup_cosine_lr, warmup_cosine_scheduler

TRAIN = dict(
    lr=5.3e-3, warmup_init_lr=1e-6, warmup_steps=10, max_steps=110, min_lr_ratio=0.1, micro_batch_size=4,
    grad_accum_steps=3, grad_clip=1.0, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, precision="bf16",
)


def lr_at(step):
    return warmup_cosine_lr(step, TRAIN["lr"], 1e-6, 10, 110, 0.1)


def test_warmup_starts_at_init_lr_and_rises_linearly_to_max():
    assert lr_at(0) == pytest.approx(1e-6)
    assert lr_at(5) == pytest.approx((1e-6 + 5.3e-3) / 2)
    assert lr_at(10) == pytest.approx(5.3e-3)


def test_cosine_decays_to_a_tenth_of_max():
    assert lr_at(60) == pytest.approx(0.1 * 5.3e-3 + 0.9 * 5.3e-3 * 0.5)
    assert lr_at(110) == pytest.approx(0.53e-3)
    assert lr_at(500) == pytest.approx(0.53e-3)
    decay = [lr_at(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_scheduler_drives_the_optimizer_lr():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=TRAIN["lr"])
    sched = warmup_cosine_scheduler(opt, TRAIN)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(s) for s in range(12)])


def test_only_matrices_are_decayed():
    model = build_model(OpenELMConfig(num_layers=2, model_dim=64, head_dim=16, vocab_size=50, ffn_dim_divisor=16))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert any(p is model.transformer.token_embeddings.weight for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_deepspeed_config_carries_the_recipe():
    ds = deepspeed_config(TRAIN, {"stage": 3}, world_size=2, use_gpu=False)
    assert ds["train_batch_size"] == 4 * 3 * 2
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] is True
    params = ds["optimizer"]["params"]
    assert ds["optimizer"]["type"] == "AdamW" and params["torch_adam"] is True and params["fused"] is True
    assert (params["betas"], params["eps"], params["weight_decay"]) == ([0.9, 0.95], 1e-8, 0.1)
    assert deepspeed_config(TRAIN, {"stage": 0}, 1, use_gpu=True)["optimizer"]["params"]["fused"] is True
    offloaded = deepspeed_config(TRAIN, {"stage": 2, "offload_optimizer": True}, 1, use_gpu=True)["optimizer"]["params"]
    assert offloaded["torch_adam"] is False and "fused" not in offloaded  # DeepSpeed's CPU Adam
    # Offloaded from a GPU into page-locked memory; on a CPU-only run there is nothing to pin for.
    for use_gpu, pinned in ((True, {"pin_memory": True}), (False, {})):
        zero = deepspeed_config(TRAIN, {"stage": 3, "offload_optimizer": True, "offload_params": True}, 1,
                                use_gpu=use_gpu)["zero_optimization"]
        assert zero["offload_optimizer"] == zero["offload_param"] == {"device": "cpu", **pinned}
    assert math.isclose(ds["gradient_clipping"], 1.0)
    fp32 = {**TRAIN, "precision": "fp32"}
    assert deepspeed_config(fp32, {"stage": 0}, 1, use_gpu=False)["gradient_clipping"] == 0.0  # the loop clips
    # bf16's wrapper steps parameters whose gradients the loop dropped: DeepSpeed clips and skips.
    assert deepspeed_config(TRAIN, {"stage": 0}, 1, use_gpu=False)["gradient_clipping"] == 1.0


def test_rewinding_a_skipped_step_restores_the_lr():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=TRAIN["lr"])
    sched = warmup_cosine_scheduler(opt, TRAIN)
    for _ in range(4):
        sched.step()
    before = (sched.last_epoch, opt.param_groups[0]["lr"], sched.get_last_lr())
    sched.step()
    rewind_one_step(sched)
    assert (sched.last_epoch, opt.param_groups[0]["lr"], sched.get_last_lr()) == before

"""The DeepSpeed engine config, derived from the train and deepspeed config groups."""


def deepspeed_config(train: dict, zero: dict, world_size: int, use_gpu: bool) -> dict:
    micro, accum = train["micro_batch_size"], train["grad_accum_steps"]
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": train["grad_clip"],
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train["lr"],
                "betas": list(train["betas"]),
                "eps": train["eps"],
                "weight_decay": train["weight_decay"],
                # FusedAdam needs CUDA; torch's AdamW is the CPU path.
                "torch_adam": not use_gpu,
            },
        },
        "zero_optimization": {"stage": zero["stage"]},
        "bf16": {"enabled": train["precision"] == "bf16"},
        "steps_per_print": 1 << 30,  # we log progress ourselves
        "wall_clock_breakdown": False,
    }

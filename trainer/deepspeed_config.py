"""The DeepSpeed engine config, derived from the train and deepspeed config groups."""


def deepspeed_guards_updates(train: dict, zero: dict) -> bool:
    """Whether DeepSpeed's optimizer wrapper clips and skips non-finite steps itself: ZeRO 1-3, and bf16
    (its mixed-precision wrapper steps even parameters without gradients, so it must do the skipping).
    Otherwise (fp32 ZeRO-0: the bare torch optimizer) the train loop does both."""
    return zero["stage"] > 0 or train["precision"] == "bf16"


def deepspeed_config(train: dict, zero: dict, world_size: int, use_gpu: bool) -> dict:
    micro, accum = train["micro_batch_size"], train["grad_accum_steps"]
    # torch's fused AdamW (CPU and CUDA): no extension to build, about 7x the speed of its default
    # per-tensor loop on CPU. Optimizer state offloaded from a GPU keeps DeepSpeed's CPU Adam.
    torch_adam = not (use_gpu and zero.get("offload_optimizer"))
    zero_section: dict = {"stage": zero["stage"]}
    # From a GPU, offloaded state goes to page-locked host memory: copies to and from it are faster.
    offload = {"device": "cpu", **({"pin_memory": True} if use_gpu else {})}
    if zero.get("offload_optimizer"):
        zero_section["offload_optimizer"] = dict(offload)
    if zero.get("offload_params"):
        zero_section["offload_param"] = dict(offload)
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": train["grad_clip"] if deepspeed_guards_updates(train, zero) else 0.0,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train["lr"],
                "betas": list(train["betas"]),
                "eps": train["eps"],
                "weight_decay": train["weight_decay"],
                "torch_adam": torch_adam,
                **({"fused": True} if torch_adam else {}),  # passed on to torch.optim.AdamW
            },
        },
        "zero_optimization": zero_section,
        # A non-finite gradient norm skips the update (ZeRO 1-3 check it; bf16 needs asking).
        "bf16": {"enabled": train["precision"] == "bf16", "check_grad_overflow": True},
        "steps_per_print": 1 << 30,  # we log progress ourselves
        "wall_clock_breakdown": False,
    }
    if zero.get("offload_optimizer") and not use_gpu:
        # DeepSpeed's CPU Adam is a compiled op; torch's AdamW does the same job on a CPU-only run.
        config["zero_force_ds_cpu_optimizer"] = False
    if zero.get("communication_data_type"):
        config["communication_data_type"] = zero["communication_data_type"]
    return config

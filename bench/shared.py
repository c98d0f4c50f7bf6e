"""What several benchmarks need: the machine's name, and the plain reference's arguments for a model."""

import platform
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def reference_kwargs(model) -> dict:
    """Keyword arguments of tests/reference_openelm.reference_logits for our OpenELM `model`."""
    cfg, plan = model.cfg, model.plan
    return dict(
        model_dim=cfg.model_dim,
        head_dim=cfg.head_dim,
        num_query_heads=list(plan.num_query_heads),
        num_kv_heads=list(plan.num_kv_heads),
        ffn_dims=list(plan.ffn_dims),
        rope_theta=cfg.rope_theta,
        norm_eps=cfg.norm_eps,
    )

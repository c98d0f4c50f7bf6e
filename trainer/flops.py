"""Model FLOPs per token, hardware peaks, and MFU (model FLOPs utilisation).

DESIGN.md ("Performance") defines the figure every benchmark reports:

    Model FLOPs per token: 6 * (non-embedding params + vocab * d) (the tied
    output head is a real matmul) + attention 6 * sum over layers of
    q_heads * head_dim * seq (causal). MFU = achieved / peak: H100 SXM bf16
    dense 989 TFLOP/s; on CPU the best square fp32 matmul (n = 1024..4096)
    with the same thread count, measured in the same run.

The 6 counts forward (2 FLOPs per multiply-add) plus backward (twice the
forward), so tokens/s * flops_per_token is the achieved rate of a training
step; activation recomputation is not counted (it is not model work).
"""

import time
from typing import Optional

import torch

from trainer.model import OpenELMConfig
from trainer.onednn_linear import ONEDNN_AVAILABLE, onednn_mm_nt


def non_embedding_params(cfg: OpenELMConfig) -> int:
    """Parameters other than the (tied) token embedding, counted from the layer plan."""
    d, hd = cfg.model_dim, cfg.head_dim
    plan = cfg.layer_plan()
    total = d  # final norm
    for q, kv, ffn in zip(plan.num_query_heads, plan.num_kv_heads, plan.ffn_dims):
        total += 2 * d  # attn_norm, ffn_norm
        total += 2 * hd  # q_norm, k_norm
        total += d * (q + 2 * kv) * hd  # qkv_proj
        total += q * hd * d  # out_proj
        total += d * 2 * ffn + ffn * d  # proj_1 (gate and value), proj_2
    return total


def flops_per_token(model_cfg: OpenELMConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), as DESIGN.md defines them.

    "Model FLOPs per token: 6 * (non-embedding params + vocab * d) (the tied
    output head is a real matmul) + attention 6 * sum over layers of
    q_heads * head_dim * seq (causal)."
    """
    plan = model_cfg.layer_plan()
    dense = non_embedding_params(model_cfg) + model_cfg.vocab_size * model_cfg.model_dim
    attention = sum(q * model_cfg.head_dim * seq_len for q in plan.num_query_heads)
    return float(6 * dense + 6 * attention)


# bf16 dense (no sparsity) tensor-core peaks, FLOP/s, from NVIDIA's data sheets.
# Matched against torch.cuda.get_device_name() in this order (most specific first).
PEAK_FLOPS: dict[str, float] = {
    "A100": 312e12,  # SXM and PCIe alike
    "H100 SXM": 989e12,  # get_device_name: "NVIDIA H100 80GB HBM3"
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H200 NVL": 835e12,
    "H200": 989e12,  # "NVIDIA H200" (SXM)
    "GH200": 989e12,
}

_NAME_PATTERNS: list[tuple[tuple[str, ...], str]] = [  # (all substrings, PEAK_FLOPS key)
    (("GH200",), "GH200"),
    (("H200", "NVL"), "H200 NVL"),
    (("H200",), "H200"),
    (("H100", "NVL"), "H100 NVL"),
    (("H100", "PCIE"), "H100 PCIe"),
    (("H100",), "H100 SXM"),  # "NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM5 80GB"
    (("A100",), "A100"),
]


def gpu_peak_flops(device_name: str) -> Optional[float]:
    """bf16 dense peak for a torch.cuda.get_device_name() string; None for a GPU not in PEAK_FLOPS."""
    name = device_name.upper()
    for needles, key in _NAME_PATTERNS:
        if all(n in name for n in needles):
            return PEAK_FLOPS[key]
    return None


def cpu_matmul_peak(
    threads: Optional[int] = None,
    sizes: tuple[int, ...] = (1024, 2048, 4096),
    dtype: torch.dtype = torch.float32,
    seconds: float = 6.0,
    clock=time.perf_counter,
) -> float:
    """Best FLOP/s of a square matmul (n x n @ n x n) over n in `sizes`, on CPU.

    Runs with `threads` torch threads (default: the current setting). Both fp32 matmuls torch offers
    are timed, torch.mm (MKL) and oneDNN's (trainer.onednn_linear.onednn_mm_nt), and the better counts:
    a peak the model's own matmuls could beat would not be a peak. Each size and
    kernel gets one warm-up product, then timed repetitions until its share of `seconds` is spent
    (at least one, at most ten); the fastest repetition counts. `clock` times them
    (time.process_time gives CPU time, which other processes on a busy machine do not inflate;
    meaningful with one thread).
    """
    kernels = [lambda a, b, out: torch.mm(a, b.t(), out=out)]
    if ONEDNN_AVAILABLE:
        kernels.append(lambda a, b, out: onednn_mm_nt(a, b))
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        best = 0.0
        budget = seconds / (len(sizes) * len(kernels))
        for n in sizes:
            a = torch.randn(n, n, dtype=dtype)
            b = torch.randn(n, n, dtype=dtype)
            out = torch.empty(n, n, dtype=dtype)
            for kernel in kernels:
                kernel(a, b, out)  # warm-up: page in, pick and build the kernel
                start = time.perf_counter()
                for rep in range(10):
                    t = clock()
                    kernel(a, b, out)
                    best = max(best, 2 * n**3 / (clock() - t))
                    if time.perf_counter() - start > budget:
                        break
        return best
    finally:
        torch.set_num_threads(previous)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s as a fraction of the peak."""
    return tokens_per_s * flops_per_token / peak


def device_peak_flops(device: torch.device) -> Optional[float]:
    """The peak MFU divides by: the bf16 dense peak of a known GPU (None for a GPU not in PEAK_FLOPS),
    or on CPU the rank's threads times the best square matmul of one thread, measured here, now (about
    a second) and timed by CPU time: the other ranks and Ray's processes starting on the same cores
    would otherwise lower it by wall-clock, and MFU read above 100%."""
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device))
    one_thread = cpu_matmul_peak(threads=1, sizes=(1024,), seconds=1.0, clock=time.process_time)
    return torch.get_num_threads() * one_thread


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far: allocated GPU memory, or this process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux

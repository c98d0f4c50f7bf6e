from pathlib import Path

import pytest
import torch

from trainer.flops import PEAK_FLOPS, cpu_matmul_peak, flops_per_token, gpu_peak_flops, mfu, non_embedding_params
from trainer.model import OpenELMConfig, build_model


def test_flops_per_token_of_a_small_model_is_the_design_formula():
    cfg = OpenELMConfig(num_layers=3, model_dim=64, head_dim=16, num_gqa_groups=2, ffn_dim_divisor=16, vocab_size=97)
    model = build_model(cfg, device="meta")
    embedding = cfg.vocab_size * cfg.model_dim
    non_embedding = sum(p.numel() for p in model.parameters()) - embedding
    assert non_embedding_params(cfg) == non_embedding
    seq = 40
    attention = sum(layer.attn.q_heads * cfg.head_dim * seq for layer in model.transformer.layers)
    assert flops_per_token(cfg, seq) == 6 * (non_embedding + embedding) + 6 * attention


def test_flops_per_token_of_openelm_270m():
    cfg = OpenELMConfig(
        name="openelm_270m", num_layers=16, model_dim=1280, head_dim=64, num_gqa_groups=4, ffn_dim_divisor=256,
        vocab_size=32000,
    )
    # Tied embeddings: (params - vocab * d) + vocab * d is every parameter, 271,527,168.
    q_heads = [12] * 5 + [16] * 7 + [20] * 4
    attention = 6 * sum(q * 64 * 2048 for q in q_heads)
    assert flops_per_token(cfg, 2048) == 6 * 271_527_168 + attention
    assert flops_per_token(cfg, 2048) == pytest.approx(1.827e9, rel=1e-3)


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA H100 PCIe", PEAK_FLOPS["H100 PCIe"]),
        ("NVIDIA GeForce RTX 4090", None),
        ("", None),
    ],
)
def test_gpu_peak_flops_matches_device_names(name, peak):
    assert gpu_peak_flops(name) == peak


def test_cpu_matmul_peak_is_measured_and_leaves_the_thread_count_alone():
    threads = torch.get_num_threads()
    assert cpu_matmul_peak(threads=1, sizes=(128, 256), seconds=0.2) > 0
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("cores", [{0}, {0, 1}])
def test_a_cpu_peak_is_not_lowered_by_a_busy_core(tmp_path, cores):
    # A rank's peak is measured as the run starts, when other ranks and Ray's processes share its cores.
    import subprocess
    import sys

    script = (f"import os, sys, torch; os.sched_setaffinity(0, {cores}); torch.set_num_threads({len(cores)})\n"
              "from trainer.flops import device_peak_flops\n"
              "print(max(device_peak_flops(torch.device('cpu')) for _ in range(2)))")
    root = str(Path(__file__).resolve().parent.parent)

    def peak() -> float:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, check=True)
        return float(out.stdout.split()[-1])

    alone = peak()
    busy = subprocess.Popen([sys.executable, "-c", "import os\nos.sched_setaffinity(0, {0})\nwhile True: pass"])
    try:
        shared = peak()
    finally:
        busy.kill()
    assert shared > 0.75 * alone, (shared, alone)  # timed by the clock, it would be about half


def test_mfu_is_achieved_over_peak():
    assert mfu(tokens_per_s=1000.0, flops_per_token=2e9, peak=4e12) == pytest.approx(0.5)
    assert mfu(0.0, 2e9, 4e12) == 0.0

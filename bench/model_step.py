"""Model benchmark on CPU: one training step (forward + backward) of our OpenELM against the plain reference.

    .venv/bin/python bench/model_step.py [--quick] [--threads N] [--repeats N] [--clock wall|cpu] [--out results.json]

What it measures, fp32, on the same weights, the same batch and the same thread count:

1. The CPU's matmul peak: the best square fp32 matmul (n = 1024, 2048, 4096), measured at
   the start and again at the end of the run (the higher counts), so MFU is taken against
   what this machine delivered while the benchmark ran.
2. For each case, the time of forward + loss (cross-entropy + z-loss 1e-4) + backward:
   - ours: trainer.model.OpenELM + trainer.loss.lm_loss;
   - baseline: tests/reference_openelm.py (reference_logits + reference_loss), the plain
     test oracle, run with gradients (reference_logits is wrapped in torch.no_grad, so the
     undecorated function `reference_logits.__wrapped__` is called) on the same weights.
   Warm-up steps first, then steps of ours and of the reference alternate (so a load
   change on the machine hits both alike); each figure is the median.
3. Achieved model FLOP/s of ours: trainer.flops.flops_per_token (6N convention, which
   already counts the backward) * tokens / step time, as a fraction of the matmul peak.
4. The linear products' own ceiling ("linears only"): every weight of the model (the tied
   output head included) as a product of the case's batch, forward and both backward
   products through trainer.onednn_linear.linear on random inputs, each shape timed alone (best of
   3) and summed over the layers. The model's FLOPs over that sum, as a fraction of the peak,
   is what the step would achieve if nothing but these products took time.

Cases and goals:
- tiny (conf/model/openelm_tiny.yaml, vocab 4096, batch 8 x 128): ours >= 1.3x faster
  than the reference.
- 270m (conf/model/openelm_270m.yaml, batch 2 x 256): ours >= 80% of the matmul peak.
--quick runs the tiny case only.

Timing is wall-clock by default. On a machine that other processes keep busy, use
--threads 1 --clock cpu: steps and the matmul peak are then timed by this process's CPU
time, which the others do not inflate. Like `elmforge train`, the process keeps freed memory for
reuse (trainer.host_memory.keep_freed_memory: large tensors are not page-faulted in again every
step), for both paths; --no-keep-memory leaves glibc's defaults (the JSON records whether it
applied, and the MALLOC_*, GLIBC_*, OMP_* and MKL_* variables).
"""

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from shared import Z_LOSS, conf_model, cpu_name  # noqa: E402

from reference_openelm import reference_kwargs, reference_logits, reference_loss  # noqa: E402
from trainer.flops import cpu_matmul_peak, flops_per_token  # noqa: E402
from trainer.host_memory import keep_freed_memory  # noqa: E402
from trainer.loss import lm_loss  # noqa: E402
from trainer.model import Linear, build_model  # noqa: E402
from trainer.onednn_linear import linear  # noqa: E402

CASES = {  # name: (model config file, vocab override, batch, seq, goal)
    "tiny": ("openelm_tiny", 4096, 8, 128, {"speedup": 1.3}),
    "270m": ("openelm_270m", None, 2, 256, {"peak_fraction": 0.8}),
}


def linear_products_s(model, n_tokens: int, clock) -> float:
    """Seconds the model's linear products alone take (forward + both backward), shape by shape."""
    shapes: dict[tuple[int, int], int] = {}
    for module in model.modules():
        if isinstance(module, Linear):
            shapes[tuple(module.weight.shape)] = shapes.get(tuple(module.weight.shape), 0) + 1
    head = tuple(model.transformer.token_embeddings.weight.shape)
    shapes[head] = shapes.get(head, 0) + 1
    total = 0.0
    for (n_out, n_in), count in shapes.items():
        x = torch.randn(n_tokens, n_in, requires_grad=True)
        w = torch.randn(n_out, n_in, requires_grad=True)
        grad = torch.randn(n_tokens, n_out)
        best = float("inf")
        for _ in range(4):  # the first is a warm-up
            x.grad = w.grad = None
            start = clock()
            linear(x, w).backward(grad)
            best = min(best, clock() - start)
        total += best * count
    return total


def run_case(name: str, repeats: int, warmup: int, clock) -> dict:
    cfg_name, vocab, batch, seq, goal = CASES[name]
    cfg = conf_model(cfg_name, vocab)
    model = build_model(cfg, seed=0).train()
    # The reference's weights: copies of ours, leaves with gradients of their own.
    ref_weights = {k: v.detach().clone().requires_grad_() for k, v in model.state_dict().items()}
    ref_kwargs = reference_kwargs(model)
    reference_logits_with_grad = reference_logits.__wrapped__  # undo @torch.no_grad
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def ours() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss, _ = lm_loss(model(inputs), targets, Z_LOSS)
        loss.backward()
        return loss.detach()

    def reference() -> torch.Tensor:
        for w in ref_weights.values():
            w.grad = None
        loss = reference_loss(reference_logits_with_grad(ref_weights, inputs, **ref_kwargs), targets, Z_LOSS)
        loss.backward()
        return loss.detach()

    # Same computation, so the same loss and gradients (to fp32 rounding).
    loss_ours, loss_ref = ours(), reference()
    grad_diff = max(
        (p.grad - ref_weights[k].grad).abs().max().item() for k, p in model.named_parameters()
    )
    for _ in range(warmup - 1):
        ours(), reference()
    times = {"ours": [], "reference": []}
    for _ in range(repeats):
        for label, step in (("ours", ours), ("reference", reference)):
            start = clock()
            step()
            times[label].append(clock() - start)
    t_ours, t_ref = statistics.median(times["ours"]), statistics.median(times["reference"])
    n_tokens = batch * seq
    fpt = flops_per_token(cfg, seq)
    t_linears = linear_products_s(model, n_tokens, clock)
    return {
        "case": name,
        "model": cfg_name,
        "vocab": cfg.vocab_size,
        "params": model.num_params(),
        "batch": batch,
        "seq": seq,
        "flops_per_token": fpt,
        "ours_s": t_ours,
        "reference_s": t_ref,
        "ours_times_s": times["ours"],
        "reference_times_s": times["reference"],
        "speedup": t_ref / t_ours,
        "ours_tokens_per_s": n_tokens / t_ours,
        "ours_flops_per_s": fpt * n_tokens / t_ours,
        "reference_flops_per_s": fpt * n_tokens / t_ref,
        "linears_only_s": t_linears,
        "linears_only_flops_per_s": fpt * n_tokens / t_linears,
        "loss_diff": abs(loss_ours - loss_ref).item(),
        "max_grad_diff": grad_diff,
        "goal": goal,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny case only")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's current)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per path (default 7 tiny, 5 270m)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per path first")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: time by this process's CPU time (with --threads 1, on a busy machine)")
    parser.add_argument("--no-keep-memory", action="store_true",
                        help="leave glibc's malloc defaults (freed large tensors go back to the OS every step)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    kept_memory = False if args.no_keep_memory else keep_freed_memory()

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    cases = ["tiny"] if args.quick else list(CASES)
    print(f"[bench] {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {threads} threads, "
          f"freed memory {'kept for reuse' if kept_memory else 'returned to the OS (glibc defaults)'}", flush=True)
    load_start = os.getloadavg()
    if load_start[0] > 0.5:
        print(f"[bench] note: load average {load_start[0]:.1f} before starting; other processes skew the timings",
              flush=True)

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.clock == "cpu" and threads != 1:
        print("[bench] note: --clock cpu sums the CPU time of all threads; it equals step time with --threads 1",
              flush=True)
    peak_start = cpu_matmul_peak(clock=clock)
    print(f"[bench] fp32 matmul peak: {peak_start / 1e9:.1f} GFLOP/s", flush=True)
    results = []
    for name in cases:
        repeats = args.repeats or (7 if name == "tiny" else 5)
        print(f"[bench] {name}: {args.warmup} warm-up + {repeats} timed steps per path ...", flush=True)
        results.append(run_case(name, repeats, max(1, args.warmup), clock))
    peak_end = cpu_matmul_peak(clock=clock)
    peak = max(peak_start, peak_end)
    print(f"[bench] fp32 matmul peak at the end: {peak_end / 1e9:.1f} GFLOP/s (using {peak / 1e9:.1f})", flush=True)

    header = ("case", "tokens", "ours ms", "ref ms", "speedup", "ours tok/s", "GFLOP/s", "of peak",
              "ref of peak", "linears only", "goal", "met")
    rows = []
    for r in results:
        r["peak_fraction"] = r["ours_flops_per_s"] / peak
        r["reference_peak_fraction"] = r["reference_flops_per_s"] / peak
        r["linears_only_peak_fraction"] = r["linears_only_flops_per_s"] / peak
        (metric, target), = r["goal"].items()
        r["goal_met"] = r[metric] >= target
        goal_text = f"{metric} >= {target:g}" if metric == "speedup" else f"peak >= {target:.0%}"
        rows.append((
            r["case"], f"{r['batch']}x{r['seq']}", f"{r['ours_s'] * 1e3:.1f}", f"{r['reference_s'] * 1e3:.1f}",
            f"{r['speedup']:.2f}x", f"{r['ours_tokens_per_s']:,.0f}", f"{r['ours_flops_per_s'] / 1e9:.1f}",
            f"{r['peak_fraction']:.1%}", f"{r['reference_peak_fraction']:.1%}",
            f"{r['linears_only_peak_fraction']:.1%}", goal_text,
            "yes" if r["goal_met"] else "NO",
        ))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print()
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths)))
    for r in results:
        print(f"[bench] {r['case']}: |loss ours - ref| = {r['loss_diff']:.2e}, "
              f"max |grad diff| = {r['max_grad_diff']:.2e}")

    if args.out:
        report = {
            "benchmark": "model_step",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "threads": threads, "torch": torch.__version__},
            "clock": args.clock,
            "keep_freed_memory": kept_memory,
            "load_average_1min": {"start": load_start[0], "end": os.getloadavg()[0]},
            "environment": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "GLIBC_", "OMP_", "MKL_"))},
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "matmul_peak_flops": {"start": peak_start, "end": peak_end, "used": peak},
            "cases": results,
        }
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"[bench] wrote {args.out}")


if __name__ == "__main__":
    main()

"""Training-step benchmark of our OpenELM on one device, Ray-free: tokens/s and MFU.

    python bench/gpu_step.py --model openelm_1_1b [--compile] [--engine torch|deepspeed]
        [--micro-batch N] [--seq 2048] [--steps 10] [--baseline reference] [--out results.jsonl]
    python bench/gpu_step.py --device cpu --model openelm_tiny --steps 2     # the CPU smoke run

One step = forward, z-loss cross-entropy (trainer.loss.lm_loss), backward, gradient
clipping at 1.0 and an AdamW step, on synthetic tokens (seeded uniform draws from the
vocabulary), at --seq tokens per sample. Precision on a GPU: bf16 (the OpenELM recipe);
on CPU: fp32.

Engines:
- torch (default): fp32 master parameters, bf16 autocast, torch.optim.AdamW (fused=True),
  torch.nn.utils.clip_grad_norm_. --compile compiles the forward and the loss together.
- deepspeed: a ZeRO-0 DeepSpeed engine built from trainer.deepspeed_config (bf16 params,
  fp32 master weights inside DeepSpeed, torch's fused AdamW), as elmforge train builds it, in
  a world of one (trainer.distributed; no Ray). --compile compiles as train.compile=true does
  (engine.compile() and the loss).

Activation checkpointing follows the model config (on for 450M and up), unless
--activation-checkpointing on|off says otherwise. If the micro-batch does not fit, it is
halved until it does (the record says which ran).

--baseline reference also times forward + backward (no optimizer) of ours and of the
plain reference (tests/reference_openelm.py, with gradients, on the same weights and batch,
same autocast), and reports the speedup.

Figures: tokens/s over the timed steps (after --warmup untimed ones, which include
compilation), MFU = tokens/s * trainer.flops.flops_per_token / peak, where peak is the
bf16 dense figure for the GPU (trainer.flops.gpu_peak_flops) or, on CPU, the fp32 matmul
peak measured in this run. One JSON line per run goes to --out (appended) and to stdout.
"""

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from reference_openelm import reference_kwargs  # noqa: E402
from shared import Z_LOSS, conf_model  # noqa: E402

from trainer.flops import cpu_matmul_peak, flops_per_token, gpu_peak_flops, mfu  # noqa: E402
from trainer.loss import lm_loss  # noqa: E402
from trainer.model import OpenELMConfig, build_model  # noqa: E402

DEFAULT_MICRO_BATCH = {  # at seq 2048 in bf16 on an 80 GB GPU (halved on out-of-memory)
    "openelm_270m": 8,  # no activation checkpointing
    "openelm_450m": 16,
    "openelm_1_1b": 16,  # the recipe's 16 sequences per GPU
    "openelm_3b": 4,
}
TRAIN = {  # the OpenELM recipe's optimizer settings
    "lr": 2.4e-3,
    "betas": (0.9, 0.95),
    "eps": 1e-8,
    "weight_decay": 0.1,
    "grad_clip": 1.0,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class TorchEngine:
    """fp32 master weights, autocast to bf16 (on a GPU), torch's fused AdamW."""

    def __init__(self, model: torch.nn.Module, device: torch.device, bf16: bool, compile_model: bool):
        from trainer.optim import param_groups

        self.model = model
        self.device = device
        self.bf16 = bf16
        # Compiling the loss with the model fuses the (tokens x vocab) softmax work into a few kernels.
        self.loss = torch.compile(self._loss) if compile_model else self._loss
        self.optimizer = torch.optim.AdamW(
            param_groups(model, TRAIN["weight_decay"]), lr=TRAIN["lr"], betas=TRAIN["betas"], eps=TRAIN["eps"], fused=True
        )

    def autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _loss(self, tokens: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            logits = self.model(tokens[:, :-1])
        return lm_loss(logits, tokens[:, 1:], Z_LOSS)[0]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        loss = self.loss(tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), TRAIN["grad_clip"], foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


class DeepSpeedEngine:
    """A ZeRO-0 DeepSpeed engine, as trainer.train_loop builds it, with torch's AdamW."""

    def __init__(self, model: torch.nn.Module, device: torch.device, bf16: bool, micro_batch: int, compile_model: bool):
        from trainer.deepspeed_config import deepspeed_config
        from trainer.distributed import init_distributed
        from trainer.optim import param_groups

        env = init_distributed(use_gpu=device.type == "cuda")
        import deepspeed  # after init_distributed has chosen the accelerator

        train = {**TRAIN, "micro_batch_size": micro_batch, "grad_accum_steps": 1, "precision": "bf16" if bf16 else "fp32"}
        config = deepspeed_config(train, {"stage": 0}, env.world_size, device.type == "cuda")
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, TRAIN["weight_decay"]), config=config
        )
        self.loss = lm_loss
        if compile_model:  # as train.compile=true does
            self.engine.compile()
            self.loss = torch.compile(lm_loss)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.engine(tokens[:, :-1])
        loss, _ = self.loss(logits, tokens[:, 1:], Z_LOSS)
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()


def time_steps(step, batch: torch.Tensor, device: torch.device, warmup: int, steps: int, budget_s: float) -> dict:
    """Run warm-up steps, then up to `steps` timed ones (fewer if `budget_s` runs out; at least one)."""
    start = time.perf_counter()
    warmup_times, losses = [], []
    for _ in range(warmup):
        t = time.perf_counter()
        losses.append(step(batch))
        sync(device)
        warmup_times.append(time.perf_counter() - t)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        losses.append(step(batch))
        sync(device)
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start > budget_s:
            break
    return {
        "warmup_s": warmup_times,
        "step_times_s": times,
        "step_s_median": statistics.median(times),
        "losses": [float(x) for x in losses],
    }


KERNEL_KINDS = (  # (kind, substrings of a kernel's name), first match wins; the rest is "other"
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "matmul", "::mm", "addmm", "bmm")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
)


def profile_steps(step, batch: torch.Tensor, device: torch.device, steps: int = 2) -> dict:
    """Device time per step by kind of kernel (matmul, attention, optimizer, other), in ms."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step(batch)
        sync(device)
    kinds = {kind: 0.0 for kind, _ in KERNEL_KINDS} | {"other": 0.0}
    others = {}
    for event in prof.key_averages():
        t = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        if t <= 0:
            continue
        name = event.key.lower()
        kind = next((k for k, needles in KERNEL_KINDS if any(n in name for n in needles)), "other")
        kinds[kind] += t / 1000 / steps
        if kind == "other":
            others[event.key[:120]] = t / 1000 / steps
    top = dict(sorted(others.items(), key=lambda kv: -kv[1])[:25])
    return {"profile_ms_per_step": kinds, "profile_top_other_ms": top}


def run_training(args, cfg: OpenELMConfig, device: torch.device, bf16: bool) -> dict:
    micro = args.micro_batch or (DEFAULT_MICRO_BATCH.get(args.model, 8) if device.type == "cuda" else 1)
    while True:
        engine = model = None
        try:
            torch.manual_seed(0)
            model = build_model(cfg, device=device, seed=0).train()
            if args.engine == "deepspeed":
                engine = DeepSpeedEngine(model, device, bf16, micro, args.compile)
            else:
                engine = TorchEngine(model, device, bf16, args.compile)
            gen = torch.Generator(device="cpu").manual_seed(0)
            batch = torch.randint(0, cfg.vocab_size, (micro, args.seq + 1), generator=gen).to(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            timing = time_steps(engine.step, batch, device, args.warmup, args.steps, args.budget)
            if args.profile:
                timing |= profile_steps(engine.step, batch, device)
            break
        except RuntimeError as error:  # torch.OutOfMemoryError is one
            if not is_oom(error) or micro == 1:
                raise
            print(f"[gpu_step] micro-batch {micro} does not fit; trying {micro // 2}", flush=True)
            del engine, model
            free_memory(device)
            micro //= 2
    tokens = micro * args.seq
    record = {"micro_batch": micro, "tokens_per_step": tokens, **timing}
    record["tokens_per_s"] = tokens / timing["step_s_median"]
    if device.type == "cuda":
        record["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if not all(math.isfinite(x) for x in timing["losses"]):
        record["error"] = "non-finite loss"
    del engine, model
    free_memory(device)
    return record


def run_reference_comparison(args, cfg: OpenELMConfig, device: torch.device, bf16: bool) -> dict:
    """Forward + backward (no optimizer) of ours and of the plain reference, same weights, batch, autocast."""
    from reference_openelm import reference_logits, reference_loss

    micro = args.micro_batch or (2 if device.type == "cuda" else 1)
    model = build_model(cfg, device=device, seed=0).train()
    forward = torch.compile(model) if args.compile else model
    weights = {k: v.detach().clone().requires_grad_() for k, v in model.state_dict().items()}
    ref_kwargs = reference_kwargs(model)
    gen = torch.Generator(device="cpu").manual_seed(0)
    batch = torch.randint(0, cfg.vocab_size, (micro, args.seq + 1), generator=gen).to(device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def ours(tokens):
        model.zero_grad(set_to_none=True)
        with autocast():
            logits = forward(tokens[:, :-1])
        loss, _ = lm_loss(logits, tokens[:, 1:], Z_LOSS)
        loss.backward()
        return loss.detach()

    def reference(tokens):
        for w in weights.values():
            w.grad = None
        # The reference builds its RoPE tables and mask without a device: make it ours.
        with torch.device(device), autocast():
            logits = reference_logits.__wrapped__(weights, tokens[:, :-1], **ref_kwargs)  # undo @torch.no_grad
        loss = reference_loss(logits, tokens[:, 1:], Z_LOSS)
        loss.backward()
        return loss.detach()

    result = {"micro_batch": micro, "tokens_per_step": micro * args.seq}
    timing = time_steps(ours, batch, device, args.warmup, args.steps, args.budget / 2)
    result["ours"] = {**timing, "tokens_per_s": micro * args.seq / timing["step_s_median"]}
    result["tokens_per_s"] = result["ours"]["tokens_per_s"]
    free_memory(device)
    try:  # the reference keeps (S x S) scores per head: it may not fit where ours does
        timing = time_steps(reference, batch, device, args.warmup, args.steps, args.budget / 2)
    except RuntimeError as error:
        if not is_oom(error):
            raise
        result["reference"] = {"error": f"out of memory at micro-batch {micro}"}
        return result
    result["reference"] = {**timing, "tokens_per_s": micro * args.seq / timing["step_s_median"]}
    result["speedup"] = result["ours"]["tokens_per_s"] / result["reference"]["tokens_per_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="openelm_1_1b", help="a conf/model/ name")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per step (default: per model)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps at most")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--budget", type=float, default=120.0, help="stop timing after this many seconds")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--engine", choices=["torch", "deepspeed"], default="torch")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on GPU")
    parser.add_argument("--activation-checkpointing", choices=["config", "on", "off"], default="config")
    parser.add_argument("--vocab", type=int, default=32000, help="for a model config without its own vocabulary")
    parser.add_argument("--baseline", choices=["none", "reference"], default="none")
    parser.add_argument("--sdpa", choices=["default", "flash", "efficient", "cudnn"], default="default",
                        help="the only attention kernel torch may pick (default: torch's own choice)")
    parser.add_argument("--profile", action="store_true", help="also record device time per kind of kernel")
    parser.add_argument("--label", default=None, help="names the run in the record")
    parser.add_argument("--out", type=Path, default=None, help="append the JSON record here")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("[gpu_step] no CUDA device here; use --device cpu for the CPU smoke run")
    if args.sdpa != "default":  # before any compilation, which reads these flags; no silent math fallback
        torch.backends.cuda.enable_math_sdp(False)
        torch.backends.cuda.enable_flash_sdp(args.sdpa == "flash")
        torch.backends.cuda.enable_mem_efficient_sdp(args.sdpa == "efficient")
        torch.backends.cuda.enable_cudnn_sdp(args.sdpa == "cudnn")
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    checkpointing = args.activation_checkpointing
    cfg = conf_model(args.model, args.vocab,
                     **({} if checkpointing == "config" else {"activation_checkpointing": checkpointing == "on"}))
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(device_name)
    else:
        device_name = "cpu"
        peak = cpu_matmul_peak(sizes=(1024, 2048), seconds=2.0)
    label = args.label or f"{args.model} {'compiled' if args.compile else 'eager'} {args.engine}"
    print(f"[gpu_step] {label}: {device_name}, torch {torch.__version__}, seq {args.seq}", flush=True)

    record = {
        "label": label,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name,
        "torch": torch.__version__,
        "model": args.model,
        "params": sum(p.numel() for p in build_model(cfg, device="meta").parameters()),
        "seq": args.seq,
        "precision": "bf16" if bf16 else "fp32",
        "engine": args.engine,
        "compile": args.compile,
        "activation_checkpointing": cfg.activation_checkpointing,
        "baseline": args.baseline,
        "sdpa": args.sdpa,
        "flops_per_token": flops_per_token(cfg, args.seq),
        "peak_flops": peak,
        "command": " ".join(["python", *sys.argv]),
    }
    start = time.perf_counter()
    try:
        if args.baseline == "reference":
            record.update(run_reference_comparison(args, cfg, device, bf16))
        else:
            record.update(run_training(args, cfg, device, bf16))
        if peak:
            record["mfu"] = mfu(record["tokens_per_s"], record["flops_per_token"], peak)
            if "speedup" in record:
                record["reference_mfu"] = mfu(record["reference"]["tokens_per_s"], record["flops_per_token"], peak)
    except Exception as error:  # the record says what failed; the exit status too
        record["error"] = f"{type(error).__name__}: {error}"[:2000]
    record["wall_s"] = time.perf_counter() - start

    line = json.dumps(record)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    summary = f"[gpu_step] {label}: "
    if "error" in record:
        summary += f"FAILED ({record['error'][:300]})"
    else:
        summary += f"micro-batch {record['micro_batch']}, {record['tokens_per_s']:,.0f} tokens/s"
        if "mfu" in record:
            summary += f", MFU {record['mfu']:.1%}"
        if "profile_ms_per_step" in record:
            summary += ", per step (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in record["profile_ms_per_step"].items())
        if "speedup" in record:
            summary += f", {record['speedup']:.2f}x the reference ({record['reference']['tokens_per_s']:,.0f} tokens/s)"
    print(summary, flush=True)
    sys.exit(1 if "error" in record else 0)


if __name__ == "__main__":
    main()

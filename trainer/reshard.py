"""Resuming a checkpoint on another number of ranks (a node lost for good, or more nodes to use).

ZeRO 1-3 save each rank's partition of the fp32 weights and Adam state, which
DeepSpeed loads only on the world size that wrote them. Its universal checkpoint
holds the same state per parameter, whole, for any world size to partition
again: rank 0 converts the checkpoint once, into step_N/universal (pruned with
it), and every rank loads from there. The data continues where it stopped
because the loader's position is global (data_pipelines/loader.py) and the
global batch, checked here, is unchanged.
"""

import contextlib
import io
import json
import logging
import shutil
import time
from argparse import Namespace
from pathlib import Path

import torch

from trainer.checkpoint import load_checkpoint
from trainer.distributed import from_rank0
from trainer.errors import TrainingError

UNIVERSAL = "universal"


def needs_universal(saved_world_size: int, world_size: int, zero_stage: int) -> bool:
    """Whether a checkpoint holds per-rank partitions this run cannot load as they are. Plain data
    parallelism (ZeRO-0) saves one whole copy of everything, which loads on any world size."""
    return saved_world_size != world_size and zero_stage > 0


def global_batch(cfg: dict, world_size: int) -> int:
    t = cfg["train"]
    return world_size * t["micro_batch_size"] * t["grad_accum_steps"]


def check_same_global_batch(saved_cfg: dict, saved_world_size: int, cfg: dict, world_size: int,
                            checkpoint: Path) -> None:
    """Another world size may continue a run only with the global batch it trained with: the same
    samples per step, so the same optimisation (and the data position carries over exactly)."""
    theirs, ours = global_batch(saved_cfg, saved_world_size), global_batch(cfg, world_size)
    if theirs != ours:
        t = cfg["train"]
        per_micro_step = world_size * t["micro_batch_size"]
        if t["global_batch_tokens"]:  # grad_accum_steps is derived from it: the batch in tokens is what to set
            hint = f"train.global_batch_tokens={theirs * cfg['data']['seq_len']}"
            if theirs % world_size:
                hint = f"a number of workers that divides its {theirs} samples"
            elif theirs % per_micro_step:
                hint += f" with a train.micro_batch_size that divides {theirs // world_size}"
        elif theirs % per_micro_step == 0:
            hint = f"train.grad_accum_steps={theirs // per_micro_step}"
        else:
            hint = "train.global_batch_tokens (or micro_batch_size and grad_accum_steps) to match"
        ranks = f"{saved_world_size} rank{'s' * (saved_world_size > 1)}"
        raise ValueError(
            f"checkpoint {checkpoint} was trained with {theirs} samples per step ({ranks} x "
            f"{saved_cfg['train']['micro_batch_size']} x {saved_cfg['train']['grad_accum_steps']} accumulated), "
            f"this run has {ours} ({world_size} x {t['micro_batch_size']} x {t['grad_accum_steps']}): set {hint}"
        )


def universal_checkpoint(checkpoint: Path, saved_world_size: int, is_main: bool) -> tuple[Path, float]:
    """The checkpoint's universal form, made by rank 0 if it is not there yet; (path, seconds taken).
    A failed conversion fails every rank with rank 0's message (none waits for it forever)."""
    target = checkpoint / UNIVERSAL
    start, error = time.perf_counter(), None
    if is_main and not (target / "COMPLETE").is_file():
        try:
            _convert(checkpoint, target, saved_world_size)
        except Exception as e:  # noqa: BLE001 - handed to every rank
            error = f"converting {checkpoint} for another world size failed: {e}"
    error = from_rank0(error)
    if error:  # a checkpoint that cannot be converted cannot be next time either: the fix is the user's
        raise TrainingError(f"{error}; to resume from the checkpoint before it, remove {checkpoint / 'COMPLETE'} "
                            "(or the directory), or resume on the number of workers that saved it")
    from deepspeed.utils import logger

    # Loading it warns that no tensor-parallel groups were given: none exist here, so it says nothing.
    logger.addFilter(_drop_tensor_parallel_warning)
    return target, time.perf_counter() - start


def _convert(checkpoint: Path, target: Path, saved_world_size: int) -> None:
    from deepspeed.checkpoint import ds_to_universal

    # The converter would fail on a missing rank's partition deep inside, with a tensor-shape error.
    missing = [r for r in range(saved_world_size) if not any(checkpoint.glob(f"*zero_pp_rank_{r}_*optim_states.pt"))]
    if missing:
        raise FileNotFoundError(f"no optimizer partition of rank(s) {missing} (*zero_pp_rank_N_*optim_states.pt)")
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    args = Namespace(input_folder=str(checkpoint), output_folder=str(partial), num_extract_workers=1,
                     num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal.main(args)  # prints its stages and progress bars
    except Exception:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    (partial / "COMPLETE").write_text(json.dumps({"from": checkpoint.name, "time": time.time()}) + "\n")
    (checkpoint / "latest_universal").unlink(missing_ok=True)  # the converter's pointer; we name the folder
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)


def load_universal(engine, universal: Path) -> dict:
    """load_checkpoint from a universal checkpoint, mending what DeepSpeed's ZeRO-3 loader gets wrong:
    one step-count tensor for all parameter groups, which AdamW then advances once per group and step,
    and left on the CPU, where torch's fused AdamW wants it on its parameter's device (as its own
    load_state_dict puts it). (It also gives every group group 0's hyperparameters: train() puts back
    the configured ones after any load, optim.keeping_configured_hyperparameters.)"""
    state = load_checkpoint(engine, universal)
    torch_optimizer = engine.optimizer.optimizer  # the torch AdamW inside DeepSpeed's ZeRO wrapper
    for param, param_state in torch_optimizer.state.items():
        if torch.is_tensor(param_state.get("step")):
            param_state["step"] = param_state["step"].to(param.device, copy=True)
    return state


def _drop_tensor_parallel_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("MPU is not provided")

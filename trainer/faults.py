"""Fault injection for recovery tests (train.faults): a rank that dies, a preemption, a loss that goes NaN."""

import os
import signal
import threading
from pathlib import Path

import torch

from trainer.preemption import request_stop


def maybe_kill(faults: dict, step: int, rank: int, run_dir: str, key: str = "kill_at_step") -> None:
    """Kill this process on `kill_rank` when `faults[key]` is this step, once per run (a marker remembers):
    kill_at_step as the step starts, kill_in_save_at_step once the step's checkpoint files are written
    but before the checkpoint is marked complete."""
    if faults[key] != step or faults["kill_rank"] != rank:
        return
    marker = Path(run_dir) / (f".fault_killed_at_step_{step}" if key == "kill_at_step" else f".fault_{key}_{step}")
    if marker.exists():
        return
    marker.write_text(f"killed by train.faults.{key}\n")
    print(f"[faults] killing rank {rank} at step {step} ({key})", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_sigterm(faults: dict, step: int, run_dir: str, rank: int) -> None:
    """Send SIGTERM to this process after `sigterm_at_step` (every rank), once per run, as a preemption would.
    Under Ray the loop runs in a worker thread, which no signal handler reaches: a preemption is SIGTERM to
    the driver, which writes run.dir/STOP, and so rank 0 writes it here."""
    if faults["sigterm_at_step"] != step:
        return
    in_a_thread = threading.current_thread() is not threading.main_thread()
    if in_a_thread and rank != 0:
        return
    marker = Path(run_dir) / f".fault_sigterm_at_step_{step}_rank_{rank}"
    if marker.exists():
        return
    marker.write_text("SIGTERM by train.faults.sigterm_at_step\n")
    if in_a_thread:
        request_stop(run_dir, "train.faults.sigterm_at_step")
    else:
        os.kill(os.getpid(), signal.SIGTERM)


def maybe_poison(loss: torch.Tensor, faults: dict, step: int, rank: int) -> torch.Tensor:
    if step in faults["nonfinite_at_steps"] and rank == faults["nonfinite_rank"]:
        return loss * float("nan")
    return loss

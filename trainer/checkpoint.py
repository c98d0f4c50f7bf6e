"""Checkpoints under run.dir/checkpoints/step_N, marked complete only once fully written.

DeepSpeed writes its (possibly sharded) model and optimizer state from every
rank; our client state (step, loader position, config) rides along. The
COMPLETE marker is written by rank 0 after all ranks finished, so a crash
mid-save never leaves a checkpoint that looks usable.
"""

import json
import time
from pathlib import Path

import torch.distributed as dist

COMPLETE = "COMPLETE"


def save_checkpoint(engine, root: str | Path, step: int, client_state: dict, is_main: bool) -> Path:
    root = Path(root)
    tag = f"step_{step}"
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state)  # every rank must call this
    dist.barrier()
    if is_main:
        (root / tag / COMPLETE).write_text(json.dumps({"step": step, "time": time.time()}) + "\n")
    dist.barrier()
    return root / tag


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(root)
    found = [p for p in root.glob("step_*") if (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))

"""Checkpoints under run.dir/checkpoints/step_N, marked complete only once fully written.

DeepSpeed writes its (possibly sharded) model, optimizer and scheduler state
from every rank; our client state (step, loader position, RNG states, config)
rides along. Rank 0 writes the COMPLETE marker after every rank has finished,
so a crash mid-save leaves no checkpoint that looks usable; resuming takes the
newest complete one. Only the newest K complete checkpoints are kept.
"""

import json
import os
import pickle
import random
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from trainer.checkpoint_digests import damage, record_digests
from trainer.errors import TrainingError, one_line

COMPLETE = "COMPLETE"


_NAME = re.compile(r"step_(\d+)")


def _step_of(path: Path) -> int:
    return int(_NAME.fullmatch(path.name).group(1))


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Every step_N directory, complete or not, oldest first (a user's `step_6_backup` is not one)."""
    root = Path(root)
    return sorted((p for p in root.glob("step_*") if _NAME.fullmatch(p.name)), key=_step_of)


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return [p for p in checkpoint_dirs(root) if (p / COMPLETE).is_file()]


def complete_ones_beside(path: Path) -> str:
    """For a message about a checkpoint path that is not there: the complete ones beside it, if any."""
    found = complete_checkpoints(path.parent) if path.parent.is_dir() else []
    return f" ({path.parent} holds {', '.join(p.name for p in found)})" if found else ""


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def rng_state() -> dict:
    """Every RNG's state as tensors and plain values, so checkpoints load with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():  # this rank's device only: a resume may see another number of GPUs
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # saved before 2026-12-08: one state per GPU the rank could see
            device = torch.cuda.current_device()
            cuda = cuda[device] if device < len(cuda) else None
        if cuda is not None:  # nothing in training draws from it (no dropout): a missing one changes nothing
            torch.cuda.set_rng_state(cuda)


def save_checkpoint(engine, root: str | Path, step: int, client_state: dict, is_main: bool, keep: int,
                    before_marking: Callable[[], None] = lambda: None) -> Path:
    root = Path(root)
    tag = f"step_{step}"
    if is_main and (root / tag).exists():  # a leftover of a crashed save at this step
        shutil.rmtree(root / tag)
    dist.barrier()
    # Every rank must call this. DeepSpeed's `latest` pointer (its zero_to_fp32.py script reads it) is
    # ours to move, once the checkpoint is complete: DeepSpeed would point it at one still being written.
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    before_marking()
    dist.barrier()
    files = record_digests(root / tag)
    if is_main:
        marker = root / tag / COMPLETE  # whole or not at all: a marker cut short would still mark it complete
        written = marker.with_name("COMPLETE.tmp")
        with open(written, "w") as f:
            f.write(json.dumps({"step": step, "time": time.time(), "files": files}) + "\n")
            f.flush()
            os.fsync(f.fileno())  # its bytes on disk before the name says it is there
        os.replace(written, marker)
        (root / "latest.tmp").write_text(tag)
        os.replace(root / "latest.tmp", root / "latest")
        _prune(root, keep)
    dist.barrier()
    return root / tag


def _prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and incomplete leftovers."""
    complete = complete_checkpoints(root)
    newest = _step_of(complete[-1])
    for path in checkpoint_dirs(root):
        if path in complete[-keep:]:
            continue
        if (path / COMPLETE).is_file() or _step_of(path) < newest:
            (path / COMPLETE).unlink(missing_ok=True)  # first: a crash mid-delete leaves no half "complete" one
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(engine, path: Path) -> dict:
    """Restore model, optimizer and scheduler from a complete checkpoint; returns our client state."""
    try:
        loaded, client_state = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:  # a truncated or corrupt file
        raise damaged(path, e) from e
    if loaded is None:
        raise damaged(path, "DeepSpeed found its files missing or unreadable")
    return client_state


def _damage(path: Path) -> str | None:
    """What differs from the file digests its COMPLETE marker recorded (every rank of a run calls it)."""
    try:
        marker = json.loads((path / COMPLETE).read_text())
    except OSError as e:
        return f"its {COMPLETE} marker cannot be read ({e.strerror or e})"
    except ValueError:
        return f"its {COMPLETE} marker is not the JSON a save writes (cut short or overwritten)"
    # Checkpoints saved before digests were recorded (and markers a user wrote as {}) have none to check.
    return damage(path, marker.get("files") if isinstance(marker, dict) else None)


def check_intact(path: Path) -> None:
    """Before resuming: every file as the save recorded it (every rank must call this)."""
    broken = _damage(path)
    if broken:
        raise damaged(path, broken)


def unreadable(path: Path, why: str | BaseException) -> ValueError:
    """A checkpoint given to export, eval or generate that cannot be read."""
    if isinstance(why, BaseException):
        why = one_line(why)
    return ValueError(f"checkpoint {path} cannot be read ({why}): a file in it is damaged or incomplete; "
                      f"use another checkpoint{complete_ones_beside(path)}")


def damaged(path: Path, why: str | BaseException) -> TrainingError:
    """A checkpoint marked complete that cannot be read: retrying would fail alike; the fix is the user's."""
    if isinstance(why, BaseException):
        why = one_line(why)
    return TrainingError(f"checkpoint {path} cannot be read ({why}); to resume from the one before it, "
                         f"remove {path / COMPLETE} (or the directory)")


def require_complete(checkpoint_dir: str | Path) -> Path:
    """The checkpoint directory, if all ranks finished writing it (a crash mid-save leaves it unmarked)
    and its files are as they were saved."""
    path = Path(checkpoint_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint directory{complete_ones_beside(path)}")
    if (path / "checkpoints").is_dir():
        newest = latest_checkpoint(path / "checkpoints")
        raise ValueError(f"{path} is a run directory, not a checkpoint: give one of its checkpoints "
                         f"({newest or 'none complete yet'})")
    if not (path / COMPLETE).is_file():
        raise ValueError(f"{path}: checkpoint has no {COMPLETE} marker: it was not fully written")
    broken = _damage(path)
    if broken:
        raise unreadable(path, broken)
    return path


def _model_states_file(checkpoint_dir: Path) -> Path:
    """Rank 0's model-states file, which carries our client state: ZeRO 0-2 and ZeRO-3 name it differently."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (checkpoint_dir / name).is_file():
            return checkpoint_dir / name
    raise FileNotFoundError(f"{checkpoint_dir}: no DeepSpeed model states file (*mp_rank_00_model_states.pt)")


def read_client_state(checkpoint_dir: str | Path) -> dict:
    """What train() saved with a checkpoint (step, loader, rng, config, ...), plus DeepSpeed's own
    bookkeeping keys beside them, as DeepSpeed's load_checkpoint returns it; not the weights."""
    path = _model_states_file(Path(checkpoint_dir))
    try:
        # DeepSpeed stores the client state at the top level of the model-states file, beside its own
        # keys: tensors and plain containers only, so no pickled code needs to run. Only the ZeRO
        # optimizer files hold pickled DeepSpeed objects (hf.py leaves those to DeepSpeed's loader).
        # mmap: the weights in the file are not read.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: holds objects other than tensors and plain data; not loading it ({e})") from None
    except (RuntimeError, OSError, EOFError) as e:  # truncated, or not a torch file at all
        # The digests tell which file differs from the save and how (torch's own error names none).
        raise damaged(Path(checkpoint_dir), _damage(Path(checkpoint_dir)) or e) from None
    missing = [k for k in ("step", "config") if k not in state]
    if missing:
        raise ValueError(f"{path}: no {missing} in the client state (not an elmforge checkpoint?)")
    return {k: v for k, v in state.items() if k != "module"}

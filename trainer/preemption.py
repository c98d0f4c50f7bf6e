"""Preemption (SIGTERM on Slurm or Kubernetes) becomes a request to checkpoint and stop.

Two ways in, so every launcher is covered: SIGTERM to this process (one
process or torchrun, where the loop runs in the main thread), or a STOP file
in run.dir, which the Ray driver writes when it gets SIGTERM (Ray Train runs
the loop in a worker thread, where no signal handler can be installed). The
loop checks once per step, agreed across ranks, so all ranks save the same
step and exit cleanly together.
"""

import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

STOP_FILE = "STOP"


def request_stop(run_dir: str | Path) -> None:
    Path(run_dir, STOP_FILE).write_text("stop requested (SIGTERM)\n")


class PreemptionWatch:
    def __init__(self, run_dir: str | Path, is_main: bool):
        self.requested = False
        self.stop_file = Path(run_dir, STOP_FILE)
        if is_main:
            self.stop_file.unlink(missing_ok=True)  # a request from an earlier, preempted attempt
        dist.barrier()
        self._previous = None
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def any_rank_requested(self, device: torch.device) -> bool:
        flag = torch.tensor([int(self.requested or self.stop_file.exists())], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

"""SIGTERM (preemption on Slurm or Kubernetes) becomes a request to checkpoint and stop.

The handler only sets a flag; the loop checks it once per step, agreed across
ranks, so all ranks save the same step and exit cleanly together.
"""

import signal
import threading

import torch
import torch.distributed as dist


class PreemptionWatch:
    def __init__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def any_rank_requested(self, device: torch.device) -> bool:
        flag = torch.tensor([int(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

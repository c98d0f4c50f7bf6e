"""Preemption (SIGTERM on Slurm or Kubernetes) or a user's request becomes a checkpoint and a clean stop.

Two ways in, so every launcher is covered: SIGTERM to this process (one
process or torchrun, where the loop runs in the main thread), or a STOP file
in run.dir, which the Ray driver writes when it gets SIGTERM (Ray Train runs
the loop in a worker thread, where no signal handler can be installed) and
which users may create by hand. The loop checks once per step, agreed across
ranks, so all ranks save the same step and exit cleanly together; the reason
is agreed too, so summary.json says who asked.
"""

import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

STOP_FILE = "STOP"
_MARK = "elmforge stop: "  # a STOP file we wrote carries its reason after this; any other is a user's
# Agreed across ranks by MAX: a rank's own SIGTERM outranks a STOP file.
_REASONS = {1: "STOP file", 2: "SIGTERM"}


def request_stop(run_dir: str | Path, reason: str) -> None:
    """Ask a running training (any launch path) to checkpoint and stop; `reason` ends up in summary.json."""
    Path(run_dir, STOP_FILE).write_text(f"{_MARK}{reason}\n")


class PreemptionWatch:
    def __init__(self, run_dir: str | Path, is_main: bool):
        self.requested = False
        self.stop_file = Path(run_dir, STOP_FILE)
        if is_main:
            self.stop_file.unlink(missing_ok=True)  # a request from an earlier, stopped attempt
        dist.barrier()
        self._previous = None
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def any_rank_requested(self, device: torch.device) -> str | None:
        """None, or why some rank was asked to stop: "SIGTERM", "STOP file", or the reason a STOP file gives."""
        code = torch.tensor([2 if self.requested else int(self.stop_file.exists())], device=device)
        dist.all_reduce(code, op=dist.ReduceOp.MAX)
        reason = _REASONS.get(int(code.item()))
        return self._file_reason() if reason == "STOP file" else reason

    def _file_reason(self) -> str:
        try:
            text = self.stop_file.read_text().strip()
        except OSError:  # another rank saw the file, this one finds it gone: the reason is still the file
            return "STOP file"
        return text[len(_MARK):] if text.startswith(_MARK) else "STOP file"

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

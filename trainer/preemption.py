"""Preemption (SIGTERM on Slurm or Kubernetes), Ctrl-C or a user's request becomes a checkpoint and a clean stop.

Two ways in, so every launcher is covered: SIGTERM or SIGINT to this process
(one process or torchrun, where the loop runs in the main thread), or a STOP
file in run.dir, which the Ray driver writes when it gets either (Ray Train
runs the loop in a worker thread, where no signal handler can be installed)
and which users may create by hand. The loop checks once per step, agreed
across ranks, so all ranks save the same step and exit cleanly together; the
reason is agreed too, so summary.json says who asked. A request is consumed
when the loop stops for it; one left over (made as a run ended) is cleared
by the next launch before its workers start, so a request made while they
start stands.
"""

import itertools
import os
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

STOP_FILE = "STOP"
_MARK = "elmforge stop: "  # a STOP file we wrote carries its reason after this; any other is a user's
# Agreed across ranks by MAX: a rank's own signal outranks a STOP file.
_REASONS = {1: "STOP file", 2: "SIGTERM", 3: "SIGINT"}
_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_requests = itertools.count()


def request_stop(run_dir: str | Path, reason: str) -> None:
    """Ask a running training (any launch path) to checkpoint and stop; `reason` ends up in summary.json.
    Written aside and renamed into place: a rank that finds the file reads it whole, never empty."""
    # A name of its own per call: a second signal can request a stop while the first's is being written.
    written = Path(run_dir, f".{STOP_FILE}.{os.getpid()}-{next(_requests)}")
    written.write_text(f"{_MARK}{reason}\n")
    os.replace(written, Path(run_dir, STOP_FILE))


def clear_stop_request(run_dir: str | Path) -> None:
    """For a launcher, before its workers start: a request left over from an earlier launch is not for this one."""
    Path(run_dir, STOP_FILE).unlink(missing_ok=True)


class PreemptionWatch:
    def __init__(self, run_dir: str | Path, is_main: bool):
        self.signal: int | None = None
        self.stop_file = Path(run_dir, STOP_FILE)
        self.is_main = is_main
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = {s: signal.signal(s, self._handle) for s in _SIGNALS}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal == signal.SIGINT:  # Ctrl-C twice: quit now, unsaved
            raise KeyboardInterrupt
        self.signal = signum

    def any_rank_requested(self, device: torch.device) -> str | None:
        """None, or why some rank was asked to stop: "SIGTERM", "SIGINT", "STOP file", or the reason a STOP
        file gives."""
        own = {signal.SIGTERM: 2, signal.SIGINT: 3}.get(self.signal, int(self.stop_file.exists()))
        code = torch.tensor([own], device=device)
        dist.all_reduce(code, op=dist.ReduceOp.MAX)
        reason = _REASONS.get(int(code.item()))
        return self._file_reason() if reason == "STOP file" else reason

    def consume(self) -> None:
        """The loop has stopped for the request: it must not stop the next launch too. After every rank
        has read its reason."""
        dist.barrier()
        if self.is_main:
            self.stop_file.unlink(missing_ok=True)

    def _file_reason(self) -> str:
        try:
            text = self.stop_file.read_text().strip()
        except OSError:  # another rank saw the file, this one finds it gone: the reason is still the file
            return "STOP file"
        return text[len(_MARK):] if text.startswith(_MARK) else "STOP file"

    def close(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

"""Stop requests: every rank agrees that a stop was asked for and why (SIGTERM, a user's STOP file, a reason)."""

import os
import signal

import torch
import torch.distributed as dist

from distributed import run_ranks
from trainer.distributed import init_distributed
from trainer.preemption import STOP_FILE, PreemptionWatch, request_stop


def _watch_through_requests(run_dir: str) -> list:
    init_distributed(use_gpu=False)
    rank = dist.get_rank()
    watch = PreemptionWatch(run_dir, is_main=rank == 0)
    cpu = torch.device("cpu")
    seen = [watch.any_rank_requested(cpu)]
    if rank == 0:
        open(os.path.join(run_dir, STOP_FILE), "w").close()  # `touch run.dir/STOP`
    dist.barrier()
    seen.append(watch.any_rank_requested(cpu))
    dist.barrier()
    if rank == 0:
        request_stop(run_dir, "stopped by the sweep's scheduler")
    dist.barrier()
    seen.append(watch.any_rank_requested(cpu))
    if rank == 1:
        os.kill(os.getpid(), signal.SIGTERM)  # one rank preempted: its own signal outranks the file
    seen.append(watch.any_rank_requested(cpu))
    watch.close()
    dist.destroy_process_group()
    return seen


def test_every_rank_agrees_on_whether_and_why_a_stop_was_requested(tmp_path):
    (tmp_path / STOP_FILE).write_text("left over from the attempt before\n")
    expected = [None, "STOP file", "stopped by the sweep's scheduler", "SIGTERM"]
    assert run_ranks(2, _watch_through_requests, str(tmp_path)) == [expected, expected]

"""Stop requests: every rank agrees that a stop was asked for and why (SIGTERM, a user's STOP file, a reason)."""

import os
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from distributed import run_ranks
from trainer.distributed import init_distributed
from trainer.preemption import STOP_FILE, PreemptionWatch, clear_stop_request, request_stop


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
    clear_stop_request(tmp_path)  # as the launcher does, before any worker starts
    expected = [None, "STOP file", "stopped by the sweep's scheduler", "SIGTERM"]
    assert run_ranks(2, _watch_through_requests, str(tmp_path)) == [expected, expected]


def test_a_rank_never_finds_a_stop_request_half_written(tmp_path):
    # A rank that sees STOP read it empty and stopped for "STOP file", not the request's reason.
    stop, done, found = tmp_path / STOP_FILE, threading.Event(), []

    def request_again_and_again():
        for _ in range(2000):
            request_stop(tmp_path, "SIGTERM to the driver")
            clear_stop_request(tmp_path)
        done.set()

    writer = threading.Thread(target=request_again_and_again)
    writer.start()
    while not done.is_set():
        try:
            found.append(stop.read_text())
        except FileNotFoundError:
            pass
    writer.join()
    assert found and set(found) == {"elmforge stop: SIGTERM to the driver\n"}


def _first_look_then_ctrl_c(run_dir: str) -> list:
    init_distributed(use_gpu=False)
    watch = PreemptionWatch(run_dir, is_main=dist.get_rank() == 0)
    cpu = torch.device("cpu")
    seen = [watch.any_rank_requested(cpu)]
    watch.consume()  # the loop stopped for it: gone for the next launch
    dist.barrier()
    seen.append(os.path.exists(os.path.join(run_dir, STOP_FILE)))
    if dist.get_rank() == 0:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in a terminal without a launcher: a stop, not a traceback
    seen.append(watch.any_rank_requested(cpu))
    if dist.get_rank() == 0:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            seen.append("still running")
        except KeyboardInterrupt:  # the second Ctrl-C quits at once
            seen.append("quit")
    watch.close()
    dist.destroy_process_group()
    return seen


def test_a_request_made_while_the_workers_start_stands_and_ctrl_c_stops_like_sigterm(tmp_path):
    request_stop(tmp_path, "SIGTERM to the driver")  # the driver, preempted before the workers' first step
    seen = run_ranks(2, _first_look_then_ctrl_c, str(tmp_path))
    assert seen == [["SIGTERM to the driver", False, "SIGINT", "quit"],
                    ["SIGTERM to the driver", False, "SIGINT"]]


def test_sigterm_to_the_whole_process_group_checkpoints_and_stops(tmp_path):
    # As `timeout`, systemd or Slurm send it: the DataLoader's worker process gets it too.
    import subprocess
    import sys

    from corpus import make_documents, write_jsonl
    from test_train_loop import SMALL_MODEL
    from trainer.summary import read_summary

    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_documents(300, seed=11))
    cmd = [sys.executable, "-m", "cluster.cli", "train", *SMALL_MODEL, f"storage_path={tmp_path}",
           f"data.sources=[{{name:gen,path:{corpus}}}]", "data.workers=0", "logger=none", "train.max_steps=200",
           "train.warmup_steps=2", "train.micro_batch_size=4", "train.grad_accum_steps=4", "train.loader_workers=1",
           "train.log_every=1",
           "cluster.launcher=local", "cluster.num_workers=1", "run.name=grouped"]
    # Not this process's rendezvous (tests before this one set RANK, MASTER_PORT... here): a run of its own.
    launch = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {**{k: v for k, v in os.environ.items() if k not in launch}, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=env)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "[train] step 2/200" in line:
            os.killpg(proc.pid, signal.SIGTERM)
            break
    out = "".join(seen) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    summary = read_summary(tmp_path / "outputs/grouped")
    assert summary["stopped_by"] == "SIGTERM" and "training stopped on request (SIGTERM;" in out
    assert (Path(summary["checkpoint"]) / "COMPLETE").is_file()

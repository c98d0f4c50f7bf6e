"""Run a function on N gloo ranks in separate processes (the Ray-free distributed path).

Each rank gets the RANK/WORLD_SIZE/MASTER_* environment a launcher would give;
trainer.distributed.init_distributed joins the group from it. Results come back
in rank order; a rank that raises or dies fails the call, naming the rank.
"""

import multiprocessing as mp
import os
import queue
import time
import traceback

from trainer.distributed import free_port


def _rank_main(fn, rank, world_size, port, args, results):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", WANDB_SILENT="true",
    )
    try:
        results.put((rank, "ok", fn(*args)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent with its traceback
        results.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


class RankFailed(RuntimeError):
    pass


# Each rank is a new process, as under a launcher, but forked from a server that has already
# imported what every rank imports: torch, DeepSpeed, and the compiler stack that torch's optimizers
# and DeepSpeed's ZeRO check import on first use (about 9 s of CPU per process on these machines).
# Its environment is the one at the first call; _rank_main sets what a launcher would.
_PRELOAD = ["trainer.train_loop", "torch._dynamo", "torch._inductor.compile_fx"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def run_ranks(world_size: int, fn, *args, timeout: float = 600) -> list:
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, port, args, results)) for r in range(world_size)]
    for p in procs:
        p.start()
    outcome = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcome) < world_size:
            try:
                rank, status, value = results.get(timeout=1)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (0, None) and r not in outcome]
                if dead:
                    raise RankFailed(f"rank(s) {dead} died: exit codes {[p.exitcode for p in procs]}") from None
                if time.monotonic() > deadline:
                    raise RankFailed(f"no result within {timeout}s") from None
                continue
            outcome[rank] = (status, value)
            if status == "error":
                break
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    errors = {r: v for r, (s, v) in outcome.items() if s == "error"}
    if errors:
        rank, message = next(iter(errors.items()))
        raise RankFailed(f"rank {rank} failed: {message}")
    return [outcome[r][1] for r in range(world_size)]

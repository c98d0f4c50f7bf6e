"""Keep freed host memory in the process, instead of handing it back to the OS every step.

glibc serves large allocations (over its mmap threshold of at most 32 MiB, and off the main
thread anything over its 64 MiB per-thread heaps) with mmap and unmaps them when freed, and trims
the free top of its heap. A training step frees and reallocates the same large tensors every step
(logits, the embedding gradient, activations), so each step page-faults them in again, zeroed by
the kernel: on CPU, 0.45 s of kernel time in a 4.9 s step of OpenELM-270M (bench/model_step.py).
With one arena (threads use the main heap too), no mmap and no trimming, freed blocks are reused.
The heap then keeps the peak of whatever ran, so after a checkpoint save or load or a validation
(peaks of their own) release_freed_memory() hands the free part back, and the next step faults
in once what it needs.

Two routes to the same settings: glibc reads ENV when a process starts (how Ray Train's workers
get them, from cluster.launch, because Ray Train runs the loop on a thread that has its own heap by
then; Ray's other processes keep glibc's defaults: one arena would serialise the tokenizer actors'
threads); keep_freed_memory() sets them in a running process (the Ray-free paths, where the loop
runs on the main thread).

For training on CPU only: on GPUs the step's large tensors live on the device, and one arena would
serialise the host threads that allocate (NCCL's, the loader's).
"""

import ctypes
import functools
import os
import sys

# mallopt parameter number (glibc's malloc.h), the environment variable glibc reads at start, value.
_SETTINGS = (
    (-8, "MALLOC_ARENA_MAX", 1),  # M_ARENA_MAX
    (-4, "MALLOC_MMAP_MAX_", 0),  # M_MMAP_MAX
    (-1, "MALLOC_TRIM_THRESHOLD_", 2**31 - 1),  # M_TRIM_THRESHOLD (an int for mallopt)
)
ENV = {name: str(value) for _, name, value in _SETTINGS}


def _set_by_user() -> bool:
    return any(name in os.environ for name in ENV)


@functools.cache
def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "gnu_get_libc_version") else None


def keep_freed_memory() -> bool:
    """Apply the settings to this process's glibc malloc; True if applied.

    Not on other C libraries, and not when the environment sets any of ENV: glibc applied those at
    start, and a user's own choice stands.
    """
    libc = _glibc()
    if libc is None or _set_by_user():
        return False
    return all(libc.mallopt(param, value) == 1 for param, _, value in _SETTINGS)


def worker_env() -> dict:
    """ENV for the processes Ray starts, unless this environment sets any of it (then it is the user's)."""
    return {} if _set_by_user() else dict(ENV)


def release_freed_memory() -> None:
    """Return the heap's free memory to the OS (glibc's malloc_trim; nothing elsewhere)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)

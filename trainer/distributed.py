"""Join (or start) the torch.distributed process group, whoever launched us.

Under Ray Train or torchrun the group or its environment exists already; a
plain `python` process becomes a world of one. Must run before deepspeed is
imported, since DS_ACCELERATOR picks DeepSpeed's device backend at import.
"""

import os
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now ("" for every interface)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# How long a rank waits in a collective. Rank 0 alone may work for long while the others wait: under
# torchrun it prepares the data (hashing every input byte, even when up to date), and on another world size
# it converts the checkpoint to its universal form (a 3B run's, from 128 ranks). torch's defaults (10
# minutes with NCCL, 30 with gloo; Ray Train's 30) would end the waiting ranks first.
PROCESS_GROUP_TIMEOUT = timedelta(hours=1)


def init_distributed(use_gpu: bool) -> DistEnv:
    # DeepSpeed still calls the old collective names; torch warns on every step.
    warnings.filterwarnings("ignore", message=r".*(_into_tensor|reduce_scatter_tensor)` is deprecated", category=FutureWarning)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_gpu:
        require_gpus(local_rank + 1, f"here (local rank {local_rank})")
    if dist.is_initialized():  # by Ray Train, which has also chosen this worker's GPU (its local rank's
        # place among the node's GPU ids, which CUDA_VISIBLE_DEVICES lists sorted as text on nodes of 10+)
        device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
    else:
        if "RANK" not in os.environ:  # a single process with no launcher
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group(backend="nccl" if use_gpu else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
        device = torch.device("cuda", local_rank) if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


def require_gpus(count: int, where: str) -> None:
    """One line instead of CUDA's assertion (or an embedded Ray waiting forever for GPUs it lacks)."""
    found = torch.cuda.device_count()
    if found < count:
        why = (f"this torch ({torch.__version__}) is built without CUDA" if torch.version.cuda is None
               else f"{found} CUDA device{'s' * (found != 1)} visible")
        raise ValueError(f"cluster.use_gpu=true needs {count} GPU{'s' * (count != 1)} {where}, but {why}; "
                         "set cluster.use_gpu=false to run on the CPU")


def mean_across_ranks(value: torch.Tensor) -> float:
    value = value.detach().float().clone()
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


def from_rank0(value):
    """Rank 0's value on every rank: for choices all ranks must make alike (which checkpoint to resume),
    where each rank's own look at a shared file system could differ."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]

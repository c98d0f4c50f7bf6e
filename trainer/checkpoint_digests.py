"""Each checkpoint file's size and SHA-256, recorded in its COMPLETE marker when saved and checked before
it is loaded: a file damaged since (a failing disk, a copy cut short, an overwrite) is named as such
instead of loading as weights that train to NaN, or worse, to something plausible.

Every rank hashes a share of the files, shares balanced by size from rank 0's listing, so a large
checkpoint on shared storage costs each rank one read of its share, at save and at load.
"""

import hashlib
from pathlib import Path

import torch.distributed as dist

from trainer.distributed import from_rank0


def _files(checkpoint: Path) -> dict[str, int]:
    """The files DeepSpeed wrote, by size: the top level of the checkpoint, less our marker (a universal
    form made later for another world size is a directory, checked by its own marker)."""
    return {p.name: p.stat().st_size for p in sorted(checkpoint.iterdir()) if p.is_file() and p.name != "COMPLETE"}


def _digest(path: Path) -> dict:
    """Size and SHA-256; an unreadable file gives its error instead, so that every rank still reaches the
    collective that follows (one rank raising alone would leave the others waiting there)."""
    try:
        with open(path, "rb") as f:
            return {"bytes": path.stat().st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}
    except OSError as e:
        return {"error": f"cannot be read ({e.strerror or e})"}


def _my_share(sizes: dict[str, int]) -> list[str]:
    """This rank's files: the largest first, each to the rank with the fewest bytes so far (the same on
    every rank). DeepSpeed's model-states file can be as large as all the optimizer shards together."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    load, mine = [0] * world, []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        least = load.index(min(load))
        load[least] += sizes[name]
        if least == rank:
            mine.append(name)
    return mine


def _gathered(part: dict) -> dict:
    if not dist.is_initialized():
        return part
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}


def record_digests(checkpoint: Path) -> dict:
    """{file name: {"bytes", "sha256"}} of the whole checkpoint, on every rank (all must call it, in the
    process group the save runs in)."""
    sizes = from_rank0(_files(checkpoint) if dist.get_rank() == 0 else None)
    digests = _gathered({name: _digest(checkpoint / name) for name in _my_share(sizes)})
    unreadable = [f"{name} {d['error']}" for name, d in sorted(digests.items()) if "error" in d]
    if unreadable:  # every rank alike
        raise OSError(f"checkpoint {checkpoint} was written but cannot be read back: {'; '.join(unreadable)}")
    return digests


def damage(checkpoint: Path, recorded: dict | None) -> str | None:
    """What differs from the digests recorded at save (None: nothing, or none were recorded, as in
    checkpoints older than this check); the same answer on every rank (all must call it)."""
    if not recorded:
        return None
    found = {}
    for name in _my_share({name: d["bytes"] for name, d in recorded.items()}):
        path = checkpoint / name
        if not path.is_file():
            found[name] = "is missing"
        elif path.stat().st_size != recorded[name]["bytes"]:
            found[name] = f"has {path.stat().st_size} bytes, {recorded[name]['bytes']} when saved"
        elif "error" in (now := _digest(path)):
            found[name] = now["error"]
        elif now["sha256"] != recorded[name]["sha256"]:
            found[name] = "has changed since it was saved (its SHA-256 differs)"
    found = _gathered(found)
    return "; ".join(f"{name} {what}" for name, what in sorted(found.items())) or None

"""Publish a directory whole: built beside its destination, then swapped in, so readers see the old one
or the new one, never a mix, and a failed build leaves the old one untouched."""

import glob
import os
import shutil
import tempfile
from pathlib import Path


def real_destination(out: Path) -> Path:
    """`out`, or the directory it links to (a symlink to a larger disk, say): builds go beside that, so
    the link stays a link and the swap is a rename within one file system."""
    return out.resolve() if out.is_symlink() else out


def swap_into_place(new: Path, out: Path) -> None:
    """Move the finished directory `new` to `out`; what `out` held is removed only after the swap."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))  # unique: a leftover is no obstacle
        os.replace(out, old)  # onto the empty directory
    try:
        os.replace(new, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(out: Path) -> None:
    """What swaps into `out` left behind when killed while deleting the directory they replaced."""
    for leftover in out.parent.glob(f"{glob.escape(f'.{out.name}.old-')}*"):  # a name may hold [ ] * ?
        shutil.rmtree(leftover, ignore_errors=True)

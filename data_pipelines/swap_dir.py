"""Publish a directory whole: built beside its destination, then swapped in, so readers see the old one
or the new one, never a mix, and a failed build leaves the old one untouched."""

import os
import shutil
from pathlib import Path


def swap_into_place(new: Path, out: Path) -> None:
    """Move the finished directory `new` to `out`; what `out` held is removed only after the swap."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)

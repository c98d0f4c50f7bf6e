"""Write packed samples into WebDataset tar shards of a fixed number of samples.

Each sample is `<key>.tokens.npy`. Tar headers carry a fixed mtime and owner so
the same samples always give byte-identical shards (and the same checksums).
"""

import hashlib
from pathlib import Path

import numpy as np
import webdataset as wds

from data_pipelines.manifest import ShardInfo


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    def __init__(self, root: Path, split: str, samples_per_shard: int):
        self.root, self.split, self.samples_per_shard = root, split, samples_per_shard
        (root / split).mkdir(parents=True, exist_ok=True)
        self.shards: list[ShardInfo] = []
        self._writer: wds.TarWriter | None = None
        self._name = ""
        self._samples = self._tokens = self._total = 0

    def write(self, sample: np.ndarray) -> None:
        if self._writer is None:
            self._open()
        self._writer.write({"__key__": f"{self._total:09d}", "tokens.npy": sample})
        self._samples += 1
        self._tokens += sample.size
        self._total += 1
        if self._samples == self.samples_per_shard:
            self._close()

    def _open(self) -> None:
        self._name = f"{self.split}/shard-{len(self.shards):06d}.tar"
        self._writer = wds.TarWriter(str(self.root / self._name), user="elmforge", group="elmforge", mtime=0.0)

    def _close(self) -> None:
        self._writer.close()
        path = self.root / self._name
        self.shards.append(ShardInfo(self._name, self._samples, self._tokens, sha256_file(path), path.stat().st_size))
        self._writer, self._samples, self._tokens = None, 0, 0

    def finish(self) -> list[ShardInfo]:
        if self._writer is not None:
            self._close()
        return self.shards

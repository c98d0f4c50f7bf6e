"""A source's kept, tokenized documents on local disk, between tokenizing and mixing.

Tokenizing each source to a cache first lets the mixer pick documents from any
source at any moment (by token deficit) and know before writing a single shard
whether a source can supply its share. Three flat files: tokens, per-document
lengths, and per-document split (1 = val).
"""

from pathlib import Path
from typing import Iterator

import numpy as np

FLUSH_TOKENS = 1 << 20


class SourceCacheWriter:
    def __init__(self, directory: Path, dtype: np.dtype):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.dtype = directory, dtype
        self._tokens = open(directory / "tokens.bin", "wb")
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self._lengths: list[int] = []
        self._splits: list[int] = []
        self.num_tokens = 0

    def add(self, ids: np.ndarray, is_val: bool) -> None:
        self._pending.append(ids.astype(self.dtype, copy=False))
        self._pending_tokens += len(ids)
        self._lengths.append(len(ids))
        self._splits.append(int(is_val))
        self.num_tokens += len(ids)
        if self._pending_tokens >= FLUSH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._tokens.write(np.concatenate(self._pending).tobytes())
        self._pending, self._pending_tokens = [], 0

    def close(self) -> "SourceCacheReader":
        self._flush()
        self._tokens.close()
        np.asarray(self._lengths, dtype=np.int64).tofile(self.directory / "lengths.bin")
        np.asarray(self._splits, dtype=np.uint8).tofile(self.directory / "splits.bin")
        return SourceCacheReader(self.directory, self.dtype)


class SourceCacheReader:
    def __init__(self, directory: Path, dtype: np.dtype):
        self.lengths = np.fromfile(directory / "lengths.bin", dtype=np.int64)
        self.splits = np.fromfile(directory / "splits.bin", dtype=np.uint8)
        size = int(self.lengths.sum())
        self.tokens = np.memmap(directory / "tokens.bin", dtype=dtype, mode="r", shape=(size,)) if size else np.zeros(0, dtype)

    @property
    def num_documents(self) -> int:
        return len(self.lengths)

    def documents(self) -> Iterator[tuple[np.ndarray, bool]]:
        offset = 0
        for length, split in zip(self.lengths.tolist(), self.splits.tolist()):
            yield self.tokens[offset : offset + length], bool(split)
            offset += length

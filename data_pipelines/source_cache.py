"""A source's kept, tokenized documents on local disk, between tokenizing and mixing.

Tokenizing each source to a cache first lets the mixer pick documents from any
source at any moment (by token deficit) and know before writing a single shard
whether a source can supply its share. Three flat files: tokens, per-document
lengths, and per-document split (1 = val).

Memory stays flat whatever the corpus size: the writer keeps 9 bytes per document
(length and split) plus up to FLUSH_TOKENS pending tokens, and the reader reads the
tokens in chunks of READ_TOKENS with plain reads. (A memory map would be simpler, but
every page the mixer touches would stay in this process's resident memory: as much
as the whole cache by the end.)
"""

from array import array
from pathlib import Path
from typing import Iterator

import numpy as np

FLUSH_TOKENS = 1 << 20
READ_TOKENS = 1 << 20


class SourceCacheWriter:
    def __init__(self, directory: Path, dtype: np.dtype):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.dtype = directory, dtype
        self._tokens = open(directory / "tokens.bin", "wb")
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self._lengths = array("q")
        self._splits = bytearray()
        self.num_tokens = 0

    def add(self, ids: np.ndarray, is_val: bool) -> None:
        self._pending.append(ids.astype(self.dtype, copy=False))
        self._pending_tokens += len(ids)
        self._lengths.append(len(ids))
        self._splits.append(1 if is_val else 0)
        self.num_tokens += len(ids)
        if self._pending_tokens >= FLUSH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._tokens.write(np.concatenate(self._pending))
        self._pending, self._pending_tokens = [], 0

    def close(self) -> "SourceCacheReader":
        self._flush()
        self._tokens.close()
        np.frombuffer(self._lengths, dtype=np.int64).tofile(self.directory / "lengths.bin")
        np.frombuffer(self._splits, dtype=np.uint8).tofile(self.directory / "splits.bin")
        return SourceCacheReader(self.directory, self.dtype)


class SourceCacheReader:
    def __init__(self, directory: Path, dtype: np.dtype):
        self.path, self.dtype = directory / "tokens.bin", np.dtype(dtype)
        self.lengths = np.fromfile(directory / "lengths.bin", dtype=np.int64)
        self.splits = np.fromfile(directory / "splits.bin", dtype=np.uint8)

    @property
    def num_documents(self) -> int:
        return len(self.lengths)

    def documents(self) -> Iterator[tuple[np.ndarray, bool]]:
        """(token ids, is_val) of every document in order; the ids are read-only views of a chunk."""
        itemsize = self.dtype.itemsize
        with open(self.path, "rb") as f:
            chunk, pos = np.zeros(0, self.dtype), 0
            for length, split in zip(self.lengths.tolist(), self.splits.tolist()):
                if pos + length > len(chunk):
                    rest = chunk[pos:]
                    more = np.frombuffer(f.read(max(READ_TOKENS, length - len(rest)) * itemsize), dtype=self.dtype)
                    chunk, pos = (np.concatenate([rest, more]) if len(rest) else more), 0
                    if length > len(chunk):
                        raise ValueError(f"{self.path} is shorter than its lengths.bin says")
                yield chunk[pos : pos + length], bool(split)
                pos += length

"""Random access to the samples of a prepared split: where each lies in its tar shard, read on first use.

A rank reads from every shard of a shuffled epoch within its first few hundred steps (OpenELM's mix:
4,400 shards of 1 GB, 160,000 samples each), so the first use of a shard must cost little. It checks
what is cheap and catches what goes wrong in practice: the file is there at the manifest's size (a copy
cut short, a shard rewritten), the layout prepare writes (every member the same size at a fixed stride:
the first two headers, the last, and the end-of-archive blocks after it are read), and then every
sample as it is read (its .npy preamble, its token ids within the tokenizer's). Parsing every header
(7 s per shard of the mix) and hashing the whole file (a full read) per process would take a rank hours
and read the whole dataset before training ran at speed; `elmforge prepare prepare.verify=true` checks
every checksum once instead. A shard of another layout is indexed header by header.
"""

import io
import os
import resource
import tarfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from data_pipelines.manifest import MANIFEST_NAME, REBUILD_FIX, Manifest, ShardInfo, rebuilt_error

BLOCK = tarfile.BLOCKSIZE
SAMPLE_SUFFIX = ".tokens.npy"


class MemberSpans:
    """Where each sample of a shard lies in its file: (offset, size) of member i. Kept for every shard
    a process has touched, which in a shuffled epoch is soon all of them (OpenELM's mix: ~700 million
    samples), so a shard we wrote, every member the same size at a fixed stride, is three numbers;
    any other two arrays, 16 bytes a sample (a list of tuples took ~116)."""

    def __init__(self, spans: list[tuple[int, int]]):
        offsets, sizes = np.array([o for o, _ in spans], np.int64), np.array([n for _, n in spans], np.int64)
        strides = np.diff(offsets)
        self.regular = len(spans) > 0 and bool((sizes == sizes[0]).all() and (strides == strides[:1]).all())
        if self.regular:
            self._first, self._stride, self._size = int(offsets[0]), int(strides[0]) if len(strides) else 0, int(sizes[0])
        else:
            self._offsets, self._sizes = offsets, sizes
        self.count = len(spans)

    @classmethod
    def strided(cls, first: int, stride: int, size: int, count: int) -> "MemberSpans":
        spans = cls.__new__(cls)
        spans.regular, spans.count = True, count
        spans._first, spans._stride, spans._size = first, stride, size
        return spans

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self.count:
            raise IndexError(i)
        if self.regular:
            return self._first + i * self._stride, self._size
        return int(self._offsets[i]), int(self._sizes[i])


def _check_member(path: Path, info: tarfile.TarInfo) -> None:
    if info.name.startswith("/") or ".." in info.name.split("/") or not info.isfile():
        raise ValueError(f"shard {path}: member {info.name!r} is not a plain file inside the archive")


def _strided_spans(f, path: Path, samples: int, file_size: int) -> MemberSpans | None:
    """The spans of a shard in prepare's layout, from its first two members' headers and its last's;
    None where the shard is laid out otherwise (then every header is read)."""
    first, second = _members_at(f, 0, 2)  # second: None for a shard of one sample
    if first is None or (samples > 1 and second is None):
        return None
    if samples == 1:
        second = None
    head = first.offset_data - first.offset  # a header's blocks (prepare's: a PAX record, then ustar)
    stride = second.offset - first.offset if second is not None else 0
    if second is not None and (second.size != first.size or second.offset_data - second.offset != head):
        return None
    last_at = first.offset + (samples - 1) * stride
    end = last_at + head + -(-first.size // BLOCK) * BLOCK
    if end + 2 * BLOCK > file_size:
        return None
    (last,) = _members_at(f, last_at, 1)
    if last is None or last.size != first.size or last.offset_data - last.offset != head:
        return None
    f.seek(end)
    if f.read(2 * BLOCK) != bytes(2 * BLOCK):
        return None  # more members than the manifest counts, or members of other sizes: the full scan says which
    return MemberSpans.strided(first.offset_data, stride, first.size, samples)


def _members_at(f, offset: int, count: int) -> list[tarfile.TarInfo | None]:
    """`count` members read from the header at `offset` on (None past the last, or at a damaged header),
    each checked to be a sample."""
    f.seek(offset)
    tar = tarfile.open(fileobj=f, mode="r:")  # reads from the file's position; offsets stay the file's
    members = [tar.next() for _ in range(count)]
    for m in members:
        if m is not None:
            _check_member(f.name, m)
    return [m if m is not None and m.name.endswith(SAMPLE_SUFFIX) else None for m in members]


def _scanned_spans(path: Path) -> MemberSpans:
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    for m in members:
        _check_member(path, m)
    return MemberSpans([(m.offset_data, m.size) for m in members if m.name.endswith(SAMPLE_SUFFIX)])


def check_shard(root: Path, shard: ShardInfo) -> MemberSpans:
    """The shard's sample spans, after checking the file against the manifest (see the module's docstring)."""
    path = root / shard.name
    if not path.is_file():
        raise FileNotFoundError(f"shard {path} listed in the manifest is missing: {REBUILD_FIX}")
    size = path.stat().st_size
    if size != shard.bytes:
        raise ValueError(f"shard {path} is truncated or altered: {size} bytes, the manifest says {shard.bytes}: "
                         f"{REBUILD_FIX}")
    try:
        with open(path, "rb") as f:
            spans = _strided_spans(f, path, shard.samples, size)
        spans = spans or _scanned_spans(path)
    except tarfile.TarError as e:
        raise ValueError(f"shard {path} is not a readable tar archive ({e}): {REBUILD_FIX}") from None
    if len(spans) != shard.samples:
        raise ValueError(f"shard {path} holds {len(spans)} samples, the manifest says {shard.samples}: {REBUILD_FIX}")
    return spans


def open_files_limit() -> int:
    """How many shards a process keeps open: a share of its descriptor limit (often 1,024; the mix has
    4,400 shards a process would otherwise hold open, with as many NFS open states), at most 1,024."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(8, min(1024, (soft if soft != resource.RLIM_INFINITY else 4096) // 4))


class SampleIndex:
    """Sample i of a split, as a 1-D token array, read with os.pread (one system call a sample)."""

    def __init__(self, manifest: Manifest, split: str):
        self.manifest, self.split = manifest, split
        self.shards = manifest.shards(split)
        self.starts = np.cumsum([0] + [s.samples for s in self.shards])
        self.num_samples = int(self.starts[-1])
        self.vocab_size = manifest.vocab_size
        self.dtype, self.sample_tokens = np.dtype(manifest.dtype), manifest.seq_len + 1
        self._spans: dict[int, MemberSpans] = {}
        self._files: OrderedDict[int, object] = OrderedDict()  # the most recently read shards, open
        self._max_open = open_files_limit()
        self._npy: dict[int, tuple[bytes, np.dtype, int]] = {}  # member size -> (.npy preamble, dtype, count)

    def _fd(self, shard_idx: int) -> int:
        if shard_idx in self._files:
            self._files.move_to_end(shard_idx)
        else:
            self._check_not_rebuilt()  # also when it opens a shard again, after it left the open ones
            if len(self._files) >= self._max_open:
                self._files.popitem(last=False)[1].close()
            self._files[shard_idx] = open(self.manifest.root / self.shards[shard_idx].name, "rb", buffering=0)
        return self._files[shard_idx].fileno()

    def __getitem__(self, i: int) -> np.ndarray:
        shard_idx = int(np.searchsorted(self.starts, i, side="right")) - 1
        if shard_idx not in self._spans:
            self._check_not_rebuilt()
            self._spans[shard_idx] = check_shard(self.manifest.root, self.shards[shard_idx])
        j = i - int(self.starts[shard_idx])
        offset, size = self._spans[shard_idx][j]
        try:
            tokens = self._decode(os.pread(self._fd(shard_idx), size, offset))
        except (ValueError, EOFError) as e:
            raise self._damaged(shard_idx, j, f"is not a token array ({e})") from None
        if tokens.size and (top := int(tokens.max())) >= self.vocab_size:
            raise self._damaged(shard_idx, j, f"holds token id {top}, beyond the tokenizer's {self.vocab_size}")
        return tokens

    def _check_not_rebuilt(self) -> None:
        """One stat, before a shard is opened: a rebuild's shards may match the old ones in name, size and
        layout, and would be read with their spans."""
        if self.manifest.replaced():
            raise rebuilt_error(self.manifest.root, self.split, f"its {MANIFEST_NAME} was replaced")

    def _damaged(self, shard_idx: int, sample: int, what: str) -> ValueError:
        path = self.manifest.root / self.shards[shard_idx].name
        return ValueError(f"shard {path}: sample {sample} {what}: the shard is damaged "
                          f"(`elmforge prepare prepare.verify=true` checks every shard): {REBUILD_FIX}")

    def _decode(self, data: bytes) -> np.ndarray:
        """np.load of one .npy member; a preamble seen before (same bytes, same size) skips re-parsing it."""
        known = self._npy.get(len(data))
        if known is not None and data.startswith(known[0]):
            preamble, dtype, count = known
            return np.frombuffer(data, dtype=dtype, count=count, offset=len(preamble))
        buf = io.BytesIO(data)
        array = np.load(buf, allow_pickle=False)
        if array.ndim != 1 or buf.tell() != len(data):
            raise ValueError(f"a {array.ndim}-D array of {array.nbytes} bytes in a {len(data)}-byte member")
        if array.dtype != self.dtype or array.size != self.sample_tokens:  # checked once per preamble
            raise ValueError(f"{array.size} {array.dtype} tokens, the manifest says {self.sample_tokens} {self.dtype}")
        self._npy[len(data)] = (data[: len(data) - array.nbytes], array.dtype, array.size)
        return array

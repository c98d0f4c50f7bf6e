"""Write packed samples into WebDataset tar shards of a fixed number of samples.

Each sample is `<key>.tokens.npy`. Tar headers carry a fixed mtime and owner so
the same samples always give byte-identical shards (and the same checksums).

The bytes are exactly those of `webdataset.TarWriter(path, user="elmforge",
group="elmforge", mtime=0.0)` (tarfile's default PAX format, mode 0o444, the .npy
of numpy.save): headers and .npy preambles come from tarfile and numpy, but are made
once per shape and re-used with only the name and checksum changed, and the shard is
hashed as it is written instead of read back. That makes a sample cost a few
microseconds instead of about a hundred.
"""

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from data_pipelines.manifest import ShardInfo

USER = GROUP = "elmforge"
MODE = 0o444
MTIME = 0.0
FLUSH_BYTES = 1 << 20
NAME, CHECKSUM = slice(0, 100), slice(148, 156)  # fields of a ustar header block


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tar_header(name: str, size: int) -> bytes:
    """The header blocks tarfile writes for a regular file (as TarFile.addfile in write mode does)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, MTIME, MODE, USER, GROUP
    return info.tobuf(tarfile.DEFAULT_FORMAT, tarfile.ENCODING, "surrogateescape")


class _Headers:
    """tar_header(name, size), made once per (name length, size) and patched for other names.

    A template is trusted only after it reproduces tarfile's header for a second name;
    otherwise (an unusual name, another Python) every header comes from tarfile.
    """

    def __init__(self):
        self._templates: dict[tuple[int, int], tuple[bytes, int] | None] = {}

    def __call__(self, name: str, size: int) -> bytes:
        if not name.isascii():
            return tar_header(name, size)
        key = (len(name), size)
        if key not in self._templates:
            self._templates[key] = self._template(name, size)
        template = self._templates[key]
        return self._patch(template, name) if template else tar_header(name, size)

    @staticmethod
    def _template(name: str, size: int) -> tuple[bytes, int] | None:
        if len(name) > 99:
            return None
        head = tar_header(name, size)
        if len(head) % 512:
            return None
        block = bytearray(head[-512:])
        if block[NAME].rstrip(b"\0") != name.encode():
            return None
        block[NAME] = bytes(100)
        block[CHECKSUM] = b" " * 8
        template = (head[:-512] + bytes(block), sum(block))
        other = "x" * len(name)
        patched = _Headers._patch(template, other)
        return template if patched == tar_header(other, size) else None

    @staticmethod
    def _patch(template: tuple[bytes, int], name: str) -> bytes:
        head, total = template
        raw = name.encode()
        block = bytearray(head[-512:])
        block[: len(raw)] = raw
        block[CHECKSUM] = b"%06o\0 " % (total + sum(raw))
        return head[:-512] + bytes(block)


class _NpyPreambles:
    """The bytes numpy.save writes before a 1-D array's data, made once per dtype and length."""

    def __init__(self):
        self._cache: dict[tuple[str, int], bytes] = {}

    def encode(self, array: np.ndarray) -> bytes:
        if array.ndim != 1 or array.dtype.hasobject:
            buf = io.BytesIO()
            npy_format.write_array(buf, array, allow_pickle=False)
            return buf.getvalue()
        key = (array.dtype.str, array.shape[0])
        if key not in self._cache:
            buf = io.BytesIO()
            npy_format.write_array(buf, array, allow_pickle=False)
            data = array.tobytes()
            full = buf.getvalue()
            assert full.endswith(data), "numpy wrote a 1-D array's data other than in C order"
            self._cache[key] = full[: len(full) - len(data)]
        return self._cache[key] + array.tobytes()


class _TarShard:
    """One tar file being written; hashed and counted as it goes."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "wb")
        self._digest = hashlib.sha256()
        self._buffer = bytearray()
        self.size = 0

    def add(self, header: bytes, data: bytes) -> None:
        self._write(header)
        self._write(data)
        pad = -len(data) % tarfile.BLOCKSIZE
        if pad:
            self._write(bytes(pad))

    def _write(self, data: bytes) -> None:
        self._buffer += data
        self.size += len(data)
        if len(self._buffer) >= FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        self._digest.update(self._buffer)
        self._file.write(self._buffer)
        self._buffer = bytearray()

    def close(self) -> str:
        """End the archive as tarfile does (two zero blocks, then zeros up to a whole record); returns the SHA-256."""
        self._write(bytes(2 * tarfile.BLOCKSIZE))
        self._write(bytes(-self.size % tarfile.RECORDSIZE))
        self._flush()
        self._file.close()
        return self._digest.hexdigest()


class ShardWriter:
    def __init__(self, root: Path, split: str, samples_per_shard: int):
        self.root, self.split, self.samples_per_shard = root, split, samples_per_shard
        (root / split).mkdir(parents=True, exist_ok=True)
        self.shards: list[ShardInfo] = []
        self._shard: _TarShard | None = None
        self._name = ""
        self._samples = self._tokens = self._total = 0
        self._headers, self._npy = _Headers(), _NpyPreambles()

    def write(self, sample: np.ndarray) -> None:
        if self._shard is None:
            self._open()
        data = self._npy.encode(sample)
        self._shard.add(self._headers(f"{self._total:09d}.tokens.npy", len(data)), data)
        self._samples += 1
        self._tokens += sample.size
        self._total += 1
        if self._samples == self.samples_per_shard:
            self._close()

    def _open(self) -> None:
        self._name = f"{self.split}/shard-{len(self.shards):06d}.tar"
        self._shard = _TarShard(self.root / self._name)

    def _close(self) -> None:
        sha256 = self._shard.close()
        path = self.root / self._name
        self.shards.append(ShardInfo(self._name, self._samples, self._tokens, sha256, path.stat().st_size))
        self._shard, self._samples, self._tokens = None, 0, 0

    def finish(self) -> list[ShardInfo]:
        if self._shard is not None:
            self._close()
        return self.shards

"""manifest.json: what a prepared dataset holds, and how to check it.

Written last, so a directory with a manifest is a complete dataset. Layout:
format_version, seq_len, dtype, tokenizer {file, fingerprint, vocab_size, bos_id,
eos_id}, source {spec, fingerprint}, stats, splits {train, val} {samples, tokens,
shards [{name, samples, tokens, sha256, bytes}]}.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

# What a damaged or missing shard's error ends with: the build is deterministic, so the same settings rebuild it.
REBUILD_FIX = "rebuild the dataset with the same data settings and prepare.force=true"


@dataclass(frozen=True)
class ShardInfo:
    name: str  # path relative to the dataset directory
    samples: int
    tokens: int
    sha256: str
    bytes: int


def rebuilt_error(root: Path, split: str, what: str) -> ValueError:
    return ValueError(
        f"dataset {root} was rebuilt while a run reads it ({what}): its {split} split is other data now. Give other "
        "data settings their own data.name; to go on, rebuild it from the run's inputs and settings and re-run the "
        "run's command"
    )


def _identity(path: Path) -> tuple:
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


@dataclass(frozen=True)
class Manifest:
    root: Path
    data: dict
    identity: tuple = ()  # manifest.json's (device, inode, size, mtime) as read: a rebuild in place replaces it

    def replaced(self) -> bool:
        """Whether manifest.json is another file now than the one read (the dataset was rebuilt in place)."""
        try:
            return _identity(self.root / MANIFEST_NAME) != self.identity
        except FileNotFoundError:
            return True

    @property
    def seq_len(self) -> int:
        return self.data["seq_len"]

    @property
    def dtype(self) -> str:
        return self.data["dtype"]

    @property
    def tokenizer_path(self) -> Path:
        return self.root / self.data["tokenizer"]["file"]

    @property
    def fingerprint(self) -> str | None:
        """What prepare recorded the dataset was built from (its inputs, settings and tokenizer)."""
        return self.data.get("source", {}).get("fingerprint")

    @property
    def vocab_size(self) -> int:
        return self.data["tokenizer"]["vocab_size"]

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in self.data["splits"]:
            raise KeyError(f"{self.root / MANIFEST_NAME}: no split {split!r} (has {sorted(self.data['splits'])})")
        return [ShardInfo(**s) for s in self.data["splits"][split]["shards"]]

    def num_samples(self, split: str) -> int:
        return sum(s.samples for s in self.shards(split))


def write_manifest(root: Path, data: dict) -> None:
    tmp = root / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps({"format_version": FORMAT_VERSION, **data}, indent=2) + "\n")
    os.replace(tmp, root / MANIFEST_NAME)


def read_manifest(root: str | Path) -> Manifest:
    root = Path(root)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `elmforge prepare` for this data config first")
    identity = _identity(path)  # before reading: a file replaced in between reads as replaced later
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r}, this elmforge reads {FORMAT_VERSION}; prepare it again")
    missing = [k for k in ("seq_len", "dtype", "tokenizer", "splits") if k not in data]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    return Manifest(root, data, identity)

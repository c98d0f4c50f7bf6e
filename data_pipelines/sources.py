"""Text sources: local files by glob, read one document at a time.

`package://data_pipelines/sample/...` names a file shipped inside this package,
so the bundled sample corpus is found wherever elmforge is installed.
"""

import glob
import gzip
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

PACKAGE_SCHEME = "package://"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Document:
    text: str
    origin: str  # "file:line", for error messages and skipped-record reports


def resolve_path(path: str) -> str:
    if path.startswith(PACKAGE_SCHEME):
        return str(PACKAGE_ROOT / path[len(PACKAGE_SCHEME) :])
    return os.path.abspath(os.path.expanduser(path))


def expand_files(pattern: str) -> list[str]:
    """All files a source's path or glob names, sorted so runs are reproducible."""
    resolved = resolve_path(pattern)
    files = sorted(glob.glob(resolved, recursive=True))
    if not files:
        raise FileNotFoundError(f"data source {pattern!r} matches no file (looked for {resolved})")
    return files


def _open_text(path: str) -> io.TextIOBase:
    raw = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")


def read_file(path: str, text_field: str = "text") -> Iterator[Document]:
    """Documents of one file: a JSON object per line (.jsonl[.gz]) or the whole file (.txt[.gz])."""
    name = path[:-3] if path.endswith(".gz") else path
    with _open_text(path) as f:
        if name.endswith(".jsonl"):
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise ValueError(f"{path}:{line_no}: record has no {text_field!r} field")
                yield Document(str(record[text_field]), f"{path}:{line_no}")
        elif name.endswith(".txt"):
            yield Document(f.read(), f"{path}:1")
        else:
            raise ValueError(f"{path}: unsupported file type (expected .jsonl, .jsonl.gz, .txt or .txt.gz)")


def iter_documents(sources: list[dict]) -> Iterator[Document]:
    """Documents of every source in order; each source is {path, text_field}."""
    for source in sources:
        for path in expand_files(source["path"]):
            yield from read_file(path, source.get("text_field", "text"))


def fingerprint_sources(sources: list[dict]) -> str:
    """SHA-256 over every input file's name and bytes: changes whenever an input does."""
    digest = hashlib.sha256()
    for source in sources:
        for path in expand_files(source["path"]):
            digest.update(os.path.basename(path).encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()

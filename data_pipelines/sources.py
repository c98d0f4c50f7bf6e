"""Text sources: local files by glob, or Hugging Face datasets streamed by id/config/split.

A source is split into *read units* (one local file, or one shard of a streamed
Hugging Face dataset) so readers can run in parallel while the order of
documents stays fixed. `package://data_pipelines/...` names a file shipped in
this package (the bundled sample corpus).

Local formats: .jsonl, .json (JSON lines), .txt (one document per file, or the
documents between a source's `separator`), each optionally .gz or .zst
compressed, and .parquet. Non-UTF-8 bytes are replaced
and counted; a record without the text field is a bad record (skipped and
counted, or an error with `on_bad_record=error`); a file that is not what its
extension says is an error naming it.
"""

import codecs
import glob
import gzip
import hashlib
import io
import json
import os
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterator, Optional

import zstandard

PACKAGE_SCHEME = "package://"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
TEXT_SUFFIXES = (".jsonl", ".json", ".txt")
COMPRESSIONS = (".gz", ".zst")
# `datasets`' builders that read the files hf_data_files names (a hub dataset's are relative to its repo).
PACKAGED_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "webdataset", "pandas")
LATER_SETTINGS = ("separator",)  # source settings added after the first datasets were prepared
PROBE_RECORDS = 100  # records of each JSON-lines file looked at for the text field before any work


@dataclass(frozen=True)
class Record:
    """One document as read, or a bad record (text None, `bad` says why)."""

    text: Optional[str]
    origin: str  # "file:line" or "hf-id[shard k]#n", for reports
    replaced: int = 0  # characters replaced because the bytes were not UTF-8
    bad: str = ""
    detail: str = ""  # what exactly is wrong with a bad record, for messages
    pos: int = 0  # bytes of the file read up to this record, for progress


@dataclass(frozen=True)
class ReadUnit:
    """What one reader reads: a local file or one shard of a Hugging Face dataset."""

    source: int
    path: Optional[str] = None
    hf: Optional[dict] = None
    shard: int = 0
    num_shards: int = 1
    size: int = 0  # bytes on disk, for progress (0 when unknown)
    separator: Optional[str] = None  # .txt: documents end at it (None: the file is one document)


def source_name(spec: dict, index: int) -> str:
    return spec.get("name") or spec.get("hf") or spec.get("path") or f"source {index}"


def resolve_path(path: str) -> str:
    if path.startswith(PACKAGE_SCHEME):
        return str(PACKAGE_ROOT / path[len(PACKAGE_SCHEME) :])
    return os.path.abspath(os.path.expanduser(path))


def expand_files(pattern: str) -> list[str]:
    """All files a path or glob names, sorted so runs are reproducible."""
    resolved = resolve_path(pattern)
    if os.path.isdir(resolved):
        raise IsADirectoryError(f"data source {pattern!r} is a directory: name its files, e.g. {_glob_hint(pattern, resolved)}")
    if os.path.isfile(resolved):  # as named, even where it holds glob characters ("corpus[v2].jsonl")
        return [resolved]
    files = sorted(f for f in glob.glob(resolved, recursive=True) if os.path.isfile(f))
    if not files:
        raise FileNotFoundError(f"data source {pattern!r} matches no file (looked for {resolved})")
    return files


def _glob_hint(pattern: str, directory: str) -> str:
    """A glob for the readable files the directory holds most of (recursive when some lie deeper)."""
    count, deeper = Counter(), set()
    for root, _, names in os.walk(directory):
        for name in names:
            try:
                fmt, compression = format_of(name)
            except ValueError:
                continue
            suffix = f".{fmt}{compression}"
            count[suffix] += 1
            if root != directory:
                deeper.add(suffix)
    suffix = count.most_common(1)[0][0] if count else ".jsonl"
    return f"{pattern.rstrip('/')}/{'**/' if suffix in deeper else ''}*{suffix}"


def _hf_dataset(hf: dict):
    """The streaming `datasets.IterableDataset` of a source (reads nothing yet)."""
    import datasets

    if saved_to_disk(hf["id"]):
        return _from_disk(hf)
    return datasets.load_dataset(
        hf["id"], name=hf.get("config"), split=hf.get("split", "train"), data_files=hf.get("data_files"), streaming=True
    )


def saved_to_disk(path: str) -> bool:
    """A directory written by Dataset.save_to_disk or DatasetDict.save_to_disk (load_dataset refuses those)."""
    return any(os.path.isfile(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))


def _from_disk(hf: dict):
    """A save_to_disk directory as an IterableDataset with one shard per Arrow file."""
    import datasets

    if hf.get("config") or hf.get("data_files"):
        raise ValueError(f"{hf['id']} was written by save_to_disk: hf_config and hf_data_files do not apply to it")
    ds = datasets.load_from_disk(hf["id"])
    if isinstance(ds, datasets.DatasetDict):
        split = hf.get("split", "train")
        if split not in ds:
            raise ValueError(f"{hf['id']} has no split {split!r} (has {sorted(ds)}); set the source's hf_split")
        ds = ds[split]
    return ds.to_iterable_dataset(num_shards=max(1, min(len(ds.cache_files), len(ds))))


def check_saved_dataset(spec: dict, index: int) -> None:
    """A source that is a local save_to_disk directory, checked as files are before any work (its arrays
    are memory-mapped, nothing is read): the split it names and the text column."""
    import datasets

    path, text_field, split = spec["hf"], spec.get("text_field", "text"), spec.get("hf_split", "train")
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{path} has no split {split!r} (has {sorted(ds)}); set data.sources.{index}.hf_split")
        ds = ds[split]
    elif split != "train":
        raise ValueError(f"{path} holds one dataset, not splits: data.sources.{index}.hf_split={split} does not apply "
                         "to it; leave it out")

    def is_text(feature) -> bool:
        return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")

    feature = ds.features.get(text_field)
    if not is_text(feature):
        texts = [name for name, f in ds.features.items() if is_text(f)]
        what = f"has no column {text_field!r}" if feature is None else f"column {text_field!r} holds {feature}, not text"
        raise ValueError(f"{path}: {what} (text columns: {texts}); set data.sources.{index}.text_field")


def check_source(spec: dict, index: int) -> None:
    """What can be checked of a source before any work: local files, or a local save_to_disk directory
    (a hub dataset is checked as it streams)."""
    if not spec.get("hf"):
        check_files(spec, index)
    elif saved_to_disk(spec["hf"]):
        check_saved_dataset(spec, index)


def read_units(spec: dict, index: int) -> list[ReadUnit]:
    if spec.get("hf"):
        hf = {
            "id": spec["hf"],
            "config": spec.get("hf_config"),
            "split": spec.get("hf_split", "train"),
            "data_files": spec.get("hf_data_files"),
        }
        n = _hf_dataset(hf).num_shards
        return [ReadUnit(index, hf=hf, shard=k, num_shards=n) for k in range(n)]
    if not spec.get("path"):
        raise ValueError(f"data source {source_name(spec, index)!r} needs `path` (local files) or `hf` (a dataset id)")
    separator = document_separator(spec)
    return [ReadUnit(index, path=f, size=os.path.getsize(f), separator=separator) for f in expand_files(spec["path"])]


_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\"}


def document_separator(spec: dict) -> Optional[str]:
    """A source's `separator` with \\n, \\r, \\t and \\\\ read as the characters (a command-line override
    keeps them as written; YAML's double quotes have already)."""
    separator = spec.get("separator")
    return None if separator is None else re.sub(r"\\([nrt\\])", lambda m: _ESCAPES[m.group(1)], separator)


def holds_txt(paths: list[str]) -> bool:
    """Whether a separator has anything to split: a .txt file (compressed or not) among the paths."""
    return any(format_of(path)[0] == "txt" for path in paths)


def format_of(path: str) -> tuple[str, str]:
    """(format, compression) from the file name."""
    name, compression = path, ""
    for c in COMPRESSIONS:
        if name.endswith(c):
            name, compression = name[: -len(c)], c
    if name.endswith(".parquet") and not compression:
        return "parquet", ""
    for suffix in TEXT_SUFFIXES:
        if name.endswith(suffix):
            return suffix[1:], compression
    raise ValueError(f"{path}: unsupported file type (expected .jsonl, .json, .txt [.gz/.zst] or .parquet)")


@contextmanager
def _open_binary(path: str, compression: str) -> Iterator[tuple[io.BufferedIOBase, io.BufferedReader]]:
    """(decompressed stream, the file itself, whose tell() says how far into it reading got)."""
    with open(path, "rb") as file:
        if compression == ".gz":
            stream = gzip.GzipFile(fileobj=file, mode="rb")
        elif compression == ".zst":
            # Buffered so lines can be iterated (the raw zstd reader has no readline).
            stream = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(file, closefd=False))
        else:
            stream = file
        with stream:
            yield stream, file


def _decode(raw: bytes, first: bool = False) -> tuple[str, int]:
    """Text and the count of characters replaced (bytes that are not UTF-8). The first line of a file
    loses a byte order mark, which some editors put before UTF-8 text."""
    if first and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - raw.count("\ufffd".encode())


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _without_lone_surrogates(text: str) -> tuple[str, int]:
    """JSON's escapes can encode half of a surrogate pair ("\\ud83d", an emoji cut in two by a scraper),
    which no UTF-8 text can hold: each becomes U+FFFD and counts as a replaced character."""
    if text.isascii():
        return text, 0
    return _LONE_SURROGATE.subn("\ufffd", text)


# What a decompressor raises on bytes that are not its format (or are cut short).
BAD_FILE_ERRORS = (OSError, EOFError, zstandard.ZstdError)


def _bad_file(path: str, what: str, e: Exception) -> ValueError:
    return ValueError(f"{path}: not a valid {what} file ({type(e).__name__}: {e})")


def _read_lines(path: str, compression: str, text_field: str) -> Iterator[Record]:
    try:
        with _open_binary(path, compression) as (f, file):
            for line_no, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                line, replaced = _decode(raw, first=line_no == 1)
                origin, pos = f"{path}:{line_no}", file.tell()
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    if line_no == 1:  # not JSON at all: the wrong file, not a bad record
                        raise ValueError(f"{origin}: not JSON lines ({e.msg}){_json_array_hint(line)}") from None
                    yield Record(None, origin, bad="invalid_json", detail=f"{e.msg.removesuffix(' at')} at column {e.colno}", pos=pos)
                    continue
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    yield Record(None, origin, bad="missing_text_field", detail=_no_text(record, text_field), pos=pos)
                    continue
                text, lone = _without_lone_surrogates(record[text_field])
                yield Record(text, origin, replaced + lone, pos=pos)
    except BAD_FILE_ERRORS as e:
        raise _bad_file(path, compression.lstrip(".") or "text", e) from None


def bad_record_error(record: Record) -> ValueError:
    """What data.on_bad_record=error raises for the first bad record."""
    detail = f": {record.detail}" if record.detail else ""
    return ValueError(f"{record.origin}: bad record ({record.bad}{detail}); set data.on_bad_record=skip to skip such "
                      "records")


def _json_array_hint(first_line: str) -> str:
    if not first_line.lstrip().startswith("["):
        return ""
    return "; it looks like one JSON array: write one object per line instead, e.g. jq -c '.[]' a.json > a.jsonl"


def _no_text(record, text_field: str) -> str:
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    if text_field in record:
        return f"{text_field!r} is {type(record[text_field]).__name__}, not a string"
    fields = sorted(record)
    return f"no field {text_field!r}; its fields: {', '.join(fields[:20])}{' ...' if len(fields) > 20 else ''}"


def _read_txt(path: str, compression: str, separator: Optional[str] = None) -> Iterator[Record]:
    """The file as one document, or the documents between its separators. Those of a UTF-8 file are read a
    block at a time, so one document, not the file, is held (and tokenized) at once. Windows' line ends
    are split as \\n ones (cleaning drops every \\r in any case), so "\\n\\n" finds their paragraphs."""
    if separator is not None:
        separator = separator.replace("\r\n", "\n")
    try:
        with _open_binary(path, compression) as (f, file):
            head = f.read(4)
            wide = _wide_encoding(head)
            if wide:
                raw = head + f.read()
                text = raw.decode(wide, errors="replace")
                replaced = text.count("\ufffd") - raw.decode(wide, errors="ignore").count("\ufffd")
                if separator is None:
                    yield Record(text, f"{path}:1", replaced, pos=file.tell())
                    return
                # Genuine U+FFFD in such a file is rare: where some were replaced, each document counts its own.
                pieces = ((piece, piece.count("\ufffd") if replaced else 0)
                          for piece in text.replace("\r\n", "\n").split(separator))
            elif separator is None:
                text, replaced = _decode(head + f.read(), first=True)
                yield Record(text, f"{path}:1", replaced, pos=file.tell())
                return
            else:
                blocks = _lf_blocks(f, head)
                pieces = (_decode(raw, first=i == 0) for i, raw in enumerate(_split_bytes(blocks, separator.encode())))
            yield from _documents(pieces, path, separator, file)
    except BAD_FILE_ERRORS as e:
        raise _bad_file(path, compression.lstrip(".") or "text", e) from None


def _wide_encoding(head: bytes) -> Optional[str]:
    """utf-16 or utf-32 where the file's first bytes are its byte order mark (UTF-16 is what Windows calls
    "Unicode"); UTF-32's little-endian mark begins with UTF-16's, so it is tried first."""
    marks = (("utf-32", codecs.BOM_UTF32_LE), ("utf-32", codecs.BOM_UTF32_BE),
             ("utf-16", codecs.BOM_UTF16_LE), ("utf-16", codecs.BOM_UTF16_BE))
    return next((encoding for encoding, mark in marks if head.startswith(mark)), None)


def _lf_blocks(stream, head: bytes, size: int = 1 << 20) -> Iterator[bytes]:
    """The stream's bytes a block at a time, after `head`, with \\r\\n as \\n (a \\r that ends a block waits
    for the next)."""
    carry, block = b"", head
    while block:
        block = carry + block
        carry = b"\r" if block.endswith(b"\r") else b""
        yield block[: len(block) - len(carry)].replace(b"\r\n", b"\n")
        block = stream.read(size)
    yield carry


def _split_bytes(blocks: Iterator[bytes], separator: bytes) -> Iterator[bytes]:
    """The bytes between separators. In UTF-8 a character's bytes never occur inside another's, so the
    separator's bytes are found exactly where the text holds it."""
    pending, start = bytearray(), 0
    for block in blocks:
        pending += block
        while (end := pending.find(separator, start)) != -1:
            yield bytes(pending[:end])
            del pending[: end + len(separator)]
            start = 0
        start = max(0, len(pending) - len(separator) + 1)  # a separator may begin in the bytes kept
    yield bytes(pending)


def _documents(pieces: Iterator[tuple[str, int]], path: str, separator: str, file) -> Iterator[Record]:
    """The documents of (text, replaced) pieces between separators, line breaks around each dropped;
    empty ones skipped. A document's origin is the line it starts on."""
    line = 1
    for text, replaced in pieces:
        body = text.strip("\r\n")
        if body.strip():
            first = line + text[: len(text) - len(text.lstrip("\r\n"))].count("\n")
            yield Record(body, f"{path}:{first}", replaced, pos=file.tell())
        line += text.count("\n") + separator.count("\n")


def _parquet_file(path: str, text_field: str, key: str = "a data source's text_field, or eval's --text-field"):
    """The open file, once its footer shows the text column (`key`: the setting that names it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid for non-parquet bytes
        raise _bad_file(path, "parquet", e) from None
    if text_field not in pf.schema_arrow.names:
        raise ValueError(
            f"{path}: parquet file has no column {text_field!r} (has {pf.schema_arrow.names}); "
            f"name the column that holds the text ({key})"
        )
    def is_text(t) -> bool:  # any string column, dictionary-encoded ones (pandas categories) too
        t = t.value_type if pa.types.is_dictionary(t) else t
        return pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", bool)(t)

    column = pf.schema_arrow.field(text_field).type
    if not is_text(column):
        texts = [f.name for f in pf.schema_arrow if is_text(f.type)]
        raise ValueError(f"{path}: parquet column {text_field!r} holds {column}, not text (text columns: {texts}); "
                         f"name the column that holds the text ({key})")
    return pf


def _read_parquet(path: str, text_field: str) -> Iterator[Record]:
    pf = _parquet_file(path, text_field)
    bytes_per_row = os.path.getsize(path) / max(1, pf.metadata.num_rows)
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            origin, pos = f"{path}:row {row}", int(row * bytes_per_row)
            if isinstance(text, str):
                yield Record(text, origin, pos=pos)
            else:
                yield Record(None, origin, bad="missing_text_field", detail=f"{text_field!r} is null", pos=pos)


def _read_hf(unit: ReadUnit, text_field: str) -> Iterator[Record]:
    ds = _hf_dataset(unit.hf)
    if unit.num_shards > 1:
        ds = ds.shard(num_shards=unit.num_shards, index=unit.shard)
    for n, example in enumerate(ds):
        origin = f"{unit.hf['id']}[shard {unit.shard}]#{n}"
        text = example.get(text_field)
        yield Record(text, origin) if isinstance(text, str) else Record(None, origin, bad="missing_text_field")


def read_unit(unit: ReadUnit, text_field: str = "text") -> Iterator[Record]:
    """Every record of one read unit, in order."""
    if unit.hf is not None:
        yield from _read_hf(unit, text_field)
        return
    fmt, compression = format_of(unit.path)
    if fmt == "parquet":
        yield from _read_parquet(unit.path, text_field)
    elif fmt == "txt":
        yield from _read_txt(unit.path, compression, unit.separator)
    else:
        yield from _read_lines(unit.path, compression, text_field)


def check_files(spec: dict, index: int) -> list[str]:
    """A local source's files, each checked cheaply before any work, so that a wrong file or text_field
    is found before hours of tokenizing: a supported type, readable compression, the text field
    present (the parquet column; in JSON lines, a string in one of the first PROBE_RECORDS records),
    and some content in at least one file of a source that is read (weight above 0)."""
    files = expand_files(spec["path"])
    text_field = spec.get("text_field", "text")
    key = f"data.sources.{index}.text_field"
    filled = 0
    for path in files:
        fmt, compression = format_of(path)
        if fmt == "parquet":
            filled += _parquet_file(path, text_field, key).metadata.num_rows > 0
        elif fmt == "txt":
            filled += _probe_compression(path, compression)
        else:
            filled += _probe_json_lines(path, compression, text_field, key)
    if spec.get("separator") is not None and not holds_txt(files):
        raise ValueError(f"data.sources.{index}.separator: splits .txt files into documents, and data source "
                         f"{source_name(spec, index)!r} has none ({files[0]} ...): leave it out")
    if not filled and spec.get("weight", 1.0) > 0:
        empty = "its file is empty" if len(files) == 1 else f"its {len(files)} files are empty"
        raise no_document_error(source_name(spec, index), index, empty)
    return files


def no_document_error(name: str, index: int, why: str = "") -> ValueError:
    return ValueError(
        f"data source {name!r} holds no document{f' ({why})' if why else ''}; give it data, or remove it "
        f"or give it weight 0 (data.sources.{index}.weight=0)"
    )


def _probe_json_lines(path: str, compression: str, text_field: str, key: str) -> bool:
    """Whether the file holds a record; raises when none of the first ones has the text field."""
    records = list(islice(_read_lines(path, compression, text_field), PROBE_RECORDS))
    if records and not any(r.text is not None for r in records):
        first = next((r for r in records if r.bad == "missing_text_field"), None)
        if first is not None and first.detail == _no_text([], text_field):  # a whole JSON array on line 1
            raise ValueError(f"{path}: not JSON lines (line 1 is a JSON list){_json_array_hint('[')}")
        if first is not None:
            raise ValueError(
                f"{path}: none of the first {len(records)} records has a string {text_field!r} "
                f"(line {first.origin[len(path) + 1:]}: {first.detail}); set {key} to the field that holds the text"
            )
    return bool(records)


def _probe_compression(path: str, compression: str) -> bool:
    """Whether the file holds a byte once decompressed."""
    try:
        with _open_binary(path, compression) as (f, _):
            return bool(f.read(1))
    except BAD_FILE_ERRORS as e:
        raise _bad_file(path, compression.lstrip("."), e) from None


def hashed_specs(sources: list[dict]) -> list[dict]:
    """The sources' settings as dataset fingerprints, run names and a resume's data check compare them: a
    setting added since the first datasets were prepared is left out at its default (those datasets stay
    up to date, runs keep their names and resume), and a separator is compared as read (YAML's "\\n" and
    the command line's "\\\\n" are one)."""
    specs = [{k: v for k, v in spec.items() if not (k in LATER_SETTINGS and v is None)} for spec in sources]
    return [{**spec, "separator": document_separator(spec)} if "separator" in spec else spec for spec in specs]


def fingerprint_sources(sources: list[dict]) -> str:
    """SHA-256 over the sources' specs and every local input file's name and bytes.

    A Hugging Face dataset on the hub is identified by id/config/split (its content
    is the hub's to version); local files, a local dataset directory's included,
    change the fingerprint whenever a byte does.
    """
    digest = hashlib.sha256(json.dumps(hashed_specs(sources), sort_keys=True).encode())
    for spec in sources:
        if not spec.get("hf"):
            for path in expand_files(spec["path"]):
                _hash_file(digest, os.path.basename(path), path)
        elif os.path.isdir(spec["hf"]):
            for path in _dataset_files(spec["hf"]):
                _hash_file(digest, os.path.relpath(path, spec["hf"]), path)
        elif spec["hf"] in PACKAGED_BUILDERS and spec.get("hf_data_files"):  # local files (or URLs)
            for path in sorted(glob.glob(os.path.expanduser(spec["hf_data_files"]), recursive=True)):
                if os.path.isfile(path):
                    _hash_file(digest, path, path)
    return digest.hexdigest()


def _dataset_files(root: str) -> list[str]:
    """Every file of a local dataset directory, sorted; hidden ones (.git, .cache) are not data."""
    found = []
    for parent, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(parent, f) for f in files if not f.startswith(".")]
    return sorted(found)


def _hash_file(digest, name: str, path: str) -> None:
    digest.update(name.encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)

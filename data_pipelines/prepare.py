"""`elmforge prepare`: text sources -> tokenizer -> packed samples -> shards + manifest.

The dataset is built in a temporary directory and renamed into place, so an
interrupted run never leaves a directory that looks complete. A dataset whose
manifest carries the same fingerprint (config and input bytes) is reused as is.
"""

import hashlib
import json
import os
import shutil
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from data_pipelines.manifest import MANIFEST_NAME, read_manifest, write_manifest
from data_pipelines.packing import Packer, token_dtype
from data_pipelines.progress import Progress
from data_pipelines.shard_writer import ShardWriter
from data_pipelines.sources import expand_files, fingerprint_sources, iter_documents
from data_pipelines.tokenizer import fingerprint, load_tokenizer, special_ids, train_bpe

SPLITS = ("train", "val")
ENCODE_BATCH = 256


@dataclass
class Stats:
    documents_read: int = 0
    documents_kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {"empty": 0})
    tokens: int = 0


def dataset_fingerprint(data_cfg: dict, tokenizer_cfg: dict) -> str:
    """Everything that changes the shards: sources' bytes, packing and tokenizer settings."""
    relevant = {k: data_cfg[k] for k in ("sources", "seq_len", "val_fraction", "samples_per_shard")}
    spec = json.dumps({"data": relevant, "tokenizer": tokenizer_cfg}, sort_keys=True)
    return hashlib.sha256((spec + fingerprint_sources(data_cfg["sources"])).encode()).hexdigest()


def split_of(text: str, val_fraction: float) -> str:
    """A document's split from a hash of its text: stable whatever the order or number of documents."""
    bucket = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") % 1_000_000
    return "val" if bucket < val_fraction * 1_000_000 else "train"


def _clean_documents(data_cfg: dict, stats: Stats | None = None) -> Iterator[str]:
    for doc in iter_documents(data_cfg["sources"]):
        text = unicodedata.normalize("NFC", doc.text)
        if stats is not None:
            stats.documents_read += 1
            if not text.strip():
                stats.dropped["empty"] += 1
                continue
            stats.documents_kept += 1
        elif not text.strip():
            continue
        yield text


def _build_tokenizer(data_cfg: dict, tokenizer_cfg: dict, out: Path):
    target = out / "tokenizer.json"
    if tokenizer_cfg["kind"] == "file":
        if not tokenizer_cfg.get("path"):
            raise ValueError("tokenizer.kind=file needs tokenizer.path=<tokenizer.json>")
        tokenizer = load_tokenizer(tokenizer_cfg["path"])
    elif tokenizer_cfg["kind"] == "bpe":
        print(f"[prepare] training a byte-level BPE tokenizer, vocab {tokenizer_cfg['vocab_size']}", flush=True)
        tokenizer = train_bpe(_clean_documents(data_cfg), tokenizer_cfg["vocab_size"])
    else:
        raise ValueError(f"tokenizer.kind={tokenizer_cfg['kind']!r}: expected 'bpe' or 'file'")
    tokenizer.save(str(target))
    return tokenizer


def _write_shards(data_cfg: dict, tokenizer, out: Path, stats: Stats) -> tuple[dict, dict]:
    vocab = tokenizer.get_vocab_size()
    bos, eos = special_ids(tokenizer)
    dtype = token_dtype(vocab)
    packers = {s: Packer(data_cfg["seq_len"], bos, eos, dtype) for s in SPLITS}
    writers = {s: ShardWriter(out, s, data_cfg["samples_per_shard"]) for s in SPLITS}
    progress = Progress("prepare")

    def flush(batch: list[str]) -> None:
        encodings = tokenizer.encode_batch(batch, add_special_tokens=False)
        for text, enc in zip(batch, encodings):
            split = split_of(text, data_cfg["val_fraction"])
            stats.tokens += len(enc.ids) + 2
            for sample in packers[split].add(enc.ids):
                writers[split].write(sample)
        batch.clear()
        progress.update({"docs": stats.documents_read, "tokens": stats.tokens})

    batch: list[str] = []
    for text in _clean_documents(data_cfg, stats):
        batch.append(text)
        if len(batch) == ENCODE_BATCH:
            flush(batch)
    flush(batch)
    progress.update({"docs": stats.documents_read, "tokens": stats.tokens}, force=True)
    splits, tails = {}, {}
    for s in SPLITS:
        packers[s].finish()
        tails[s] = packers[s].dropped_tail_tokens
        shards = writers[s].finish()
        splits[s] = {
            "samples": sum(x.samples for x in shards),
            "tokens": sum(x.tokens for x in shards),
            "shards": [x.__dict__ for x in shards],
        }
    return splits, {"dropped_tail_tokens": tails, "dtype": dtype.name, "vocab_size": vocab, "bos": bos, "eos": eos}


def describe_plan(data_cfg: dict, tokenizer_cfg: dict) -> str:
    """What prepare would read and write, checked without writing anything."""
    lines = [f"[prepare] plan for dataset {data_cfg['name']!r} -> {data_cfg['dir']}"]
    for source in data_cfg["sources"]:
        files = expand_files(source["path"])
        size = sum(os.path.getsize(f) for f in files)
        lines.append(f"  source {source['path']}: {len(files)} file(s), {size / 1e6:.1f} MB, text field {source.get('text_field', 'text')!r}")
    tok = tokenizer_cfg["path"] if tokenizer_cfg["kind"] == "file" else f"BPE trained on the corpus, vocab {tokenizer_cfg['vocab_size']}"
    lines.append(f"  tokenizer: {tok}")
    lines.append(
        f"  samples of {data_cfg['seq_len'] + 1} tokens, {data_cfg['samples_per_shard']} per shard, "
        f"{data_cfg['val_fraction']:.1%} of documents to val"
    )
    manifest = Path(data_cfg["dir"]) / MANIFEST_NAME
    if manifest.is_file():
        current = read_manifest(data_cfg["dir"]).data.get("source", {}).get("fingerprint")
        state = "up to date" if current == dataset_fingerprint(data_cfg, tokenizer_cfg) else "out of date: would rebuild"
        lines.append(f"  existing dataset: {state}")
    return "\n".join(lines)


def prepare(data_cfg: dict, tokenizer_cfg: dict, force: bool = False) -> Path:
    """Build (or reuse) the dataset at data_cfg['dir']; returns its directory."""
    out = Path(data_cfg["dir"])
    fp = dataset_fingerprint(data_cfg, tokenizer_cfg)
    if not force and (out / MANIFEST_NAME).is_file():
        existing = read_manifest(out)
        if existing.data.get("source", {}).get("fingerprint") == fp:
            print(f"[prepare] {out} is up to date (fingerprint {fp[:12]}); nothing to do", flush=True)
            return out
        print(f"[prepare] {out} was built from other inputs or settings; rebuilding", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tokenizer = _build_tokenizer(data_cfg, tokenizer_cfg, tmp)
        stats = Stats()
        splits, info = _write_shards(data_cfg, tokenizer, tmp, stats)
        if stats.documents_kept == 0:
            raise ValueError(f"data sources {[s['path'] for s in data_cfg['sources']]} hold no non-empty document")
        if splits["train"]["samples"] == 0:
            raise ValueError(
                f"the corpus ({stats.tokens} tokens) fills no training sample of seq_len+1 = {data_cfg['seq_len'] + 1}"
            )
        write_manifest(
            tmp,
            {
                "seq_len": data_cfg["seq_len"],
                "dtype": info["dtype"],
                "tokenizer": {
                    "file": "tokenizer.json",
                    "fingerprint": fingerprint(tokenizer),
                    "vocab_size": info["vocab_size"],
                    "bos_id": info["bos"],
                    "eos_id": info["eos"],
                },
                "source": {"spec": data_cfg["sources"], "fingerprint": fp},
                "stats": {**stats.__dict__, "dropped_tail_tokens": info["dropped_tail_tokens"]},
                "splits": splits,
            },
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, out)
    print(
        f"[prepare] wrote {out}: {stats.documents_kept}/{stats.documents_read} documents, "
        f"{splits['train']['samples']} train / {splits['val']['samples']} val samples of {data_cfg['seq_len'] + 1} tokens",
        flush=True,
    )
    return out


def _publish(tmp: Path, out: Path) -> None:
    """Swap the finished dataset into place; the old one is removed only after the swap."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)

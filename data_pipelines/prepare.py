"""`elmforge prepare`: text sources -> clean + filter + dedup -> tokenize -> mix -> pack -> shards.

Stages: (1) the tokenizer is trained or loaded; (2) each source in turn is read,
cleaned, filtered and tokenized (Ray Data actor pool, order preserved) into a
local cache, deduplicated against every document kept so far, up to its share
of the token target; (3) the mixer takes documents from the caches by token
share, the packer cuts them into seq_len+1 samples and the shard writer writes
tars. Everything streams; memory holds only the dedup digests.

The dataset is built in a temporary directory and renamed into place, so an
interrupted run never leaves a directory that looks complete. A dataset whose
manifest carries the same fingerprint (settings and input bytes) is reused.
"""

import glob
import hashlib
import io
import json
import math
import os
import shutil
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from data_pipelines.cleaning import clean_text, split_of
from data_pipelines.manifest import MANIFEST_NAME, read_manifest, write_manifest
from data_pipelines.mixture import FRAMING, SourceExhausted, mix, normalised_weights
from data_pipelines.packing import Packer, token_dtype
from data_pipelines.progress import Progress, format_count
from data_pipelines.shard_writer import ShardWriter, tar_header
from data_pipelines.source_cache import SourceCacheReader, SourceCacheWriter
from data_pipelines.sources import (
    ReadUnit, bad_record_error, check_files, check_saved_dataset, check_source, document_separator, fingerprint_sources,
    hashed_specs, no_document_error, read_unit, read_units, saved_to_disk, source_name,
)
from data_pipelines.swap_dir import real_destination, remove_leftovers, swap_into_place
from data_pipelines.tokenize_stage import tokenized_batches
from data_pipelines.tokenizer import TextTokenizer, load_tokenizer, train_bpe

SPLITS = ("train", "val")
MAX_EXAMPLES = 5  # skipped-record origins kept per source for the report
FINGERPRINT_KEYS = (
    "sources", "seq_len", "val_fraction", "samples_per_shard", "shard_bytes", "target_tokens", "filters", "on_bad_record"
)
# The likely fix when a source keeps no document, by the reason most of them were dropped.
NOTHING_KEPT_HINTS = {
    "missing_text_field": "set its text_field to the field that holds the text (a null value counts as none)",
    "invalid_json": "its files are not JSON lines",
    "empty": "its documents are empty after cleaning",
    "too_few_characters": "lower data.filters.min_chars",
    "too_few_tokens": "lower data.filters.min_tokens",
    "duplicate": "each of its documents repeats one kept before it; data.filters.dedup=false keeps them",
}


@dataclass
class SourceStats:
    name: str
    documents_read: int = 0
    documents_kept: int = 0
    dropped: dict = field(default_factory=dict)
    replaced_characters: int = 0
    tokens_kept: int = 0
    skipped_examples: list = field(default_factory=list)

    def drop(self, reason: str, origin: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if reason not in ("empty", "duplicate") and len(self.skipped_examples) < MAX_EXAMPLES:
            self.skipped_examples.append(f"{origin}: {reason}")


def build_settings(data_cfg: dict, tokenizer_cfg: dict) -> dict:
    """The settings that change the shards, as {"data.seq_len": 2048, ..., "tokenizer.kind": "bpe", ...}."""
    return {**{f"data.{k}": data_cfg.get(k) for k in FINGERPRINT_KEYS},
            "data.sources": hashed_specs(data_cfg["sources"]),
            **{f"tokenizer.{k}": v for k, v in tokenizer_cfg.items()}}


def dataset_fingerprint(data_cfg: dict, tokenizer_cfg: dict) -> str:
    """Everything that changes the shards: input bytes, data settings and the tokenizer."""
    spec = {"data": {k: data_cfg.get(k) for k in FINGERPRINT_KEYS}, "tokenizer": tokenizer_cfg}
    spec["data"]["sources"] = hashed_specs(data_cfg["sources"])
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode())
    digest.update(fingerprint_sources(data_cfg["sources"]).encode())
    if tokenizer_cfg["kind"] != "bpe" and tokenizer_cfg.get("path") and os.path.isfile(tokenizer_cfg["path"]):
        digest.update(Path(tokenizer_cfg["path"]).read_bytes())
    return digest.hexdigest()


def _corpus_texts(sources: list[dict], on_bad_record: str) -> Iterator[tuple[str, Optional[float]]]:
    """(cleaned non-empty text, fraction of the local input bytes read so far) of every source in turn,
    weight-0 ones left out: their documents are never trained on, so they do not shape the vocabulary.
    With on_bad_record "error", the first bad record stops it (rather than after this whole pass)."""
    units = [u for i, spec in enumerate(sources) if spec.get("weight", 1.0) != 0 for u in read_units(spec, i)]
    total, before = sum(u.size for u in units), 0
    for unit in units:
        for record in read_unit(unit, sources[unit.source].get("text_field", "text")):
            if record.bad and on_bad_record == "error":
                raise bad_record_error(record)
            if record.text and record.text.strip():
                yield clean_text(record.text), (before + record.pos) / total if total else None
        before += unit.size


def _training_texts(data_cfg: dict, limit: Optional[int]) -> Iterator[str]:
    """The BPE's training texts, with a progress line: reading a large corpus takes a while."""
    progress = Progress("prepare tokenizer")
    n = 0
    for n, (text, fraction) in enumerate(_corpus_texts(data_cfg["sources"], data_cfg["on_bad_record"]), 1):
        yield text
        if limit:
            fraction = max(fraction or 0, n / limit)
        progress.update({"docs": n}, done_fraction=fraction)
        if limit and n >= limit:
            break
    progress.update({"docs": n}, force=True)


def build_tokenizer(data_cfg: dict, tokenizer_cfg: dict) -> TextTokenizer:
    kind = tokenizer_cfg["kind"]
    if kind == "bpe":
        print(f"[prepare] training a byte-level BPE tokenizer, vocab {tokenizer_cfg['vocab_size']}", flush=True)
        return train_bpe(_training_texts(data_cfg, tokenizer_cfg.get("max_train_documents")), tokenizer_cfg["vocab_size"])
    return given_tokenizer(tokenizer_cfg)


def given_tokenizer(tokenizer_cfg: dict) -> TextTokenizer:
    """tokenizer.path's tokenizer (tokenizer=file or llama), checked for what a build needs: cheap, so
    prepare and its dry run check it before any work."""
    kind = tokenizer_cfg["kind"]
    if not tokenizer_cfg.get("path"):
        raise ValueError(f"tokenizer.kind={kind} needs tokenizer.path=<file>")
    path = tokenizer_cfg["path"]
    tokenizer = load_tokenizer(path, "hf" if kind == "file" else "sentencepiece")
    if tokenizer.vocab_size > tokenizer_cfg["vocab_size"]:
        raise ValueError(
            f"tokenizer {path} has {tokenizer.vocab_size} tokens but tokenizer.vocab_size="
            f"{tokenizer_cfg['vocab_size']}; set tokenizer.vocab_size={tokenizer.vocab_size}"
        )
    try:
        tokenizer.special_ids()
    except ValueError as e:
        raise ValueError(f"tokenizer {path}: {e}") from None
    return tokenizer


def samples_per_shard(data_cfg: dict, dtype: np.dtype) -> int:
    """From data.samples_per_shard, or from data.shard_bytes and the exact tar member size."""
    if not data_cfg.get("shard_bytes"):
        return data_cfg["samples_per_shard"]
    buf = io.BytesIO()
    np.save(buf, np.zeros(data_cfg["seq_len"] + 1, dtype=dtype))
    # Header blocks (PAX header included) + data padded to 512-byte blocks.
    member = len(tar_header(f"{0:09d}.tokens.npy", buf.tell())) + -(-buf.tell() // 512) * 512
    return max(1, data_cfg["shard_bytes"] // member)


def _ids_of(batch):
    """(flat token values, offsets) of a processed batch's `ids` list column, without Python lists."""
    col = batch.column("ids").combine_chunks()
    return col.values.to_numpy(zero_copy_only=False), col.offsets.to_numpy()


def _cache_source(index, spec, tokenizer, data_cfg, cache_dir, dtype, budget, seen) -> tuple[SourceCacheReader, SourceStats]:
    """Stage 2 for one source: tokenize into the cache until done or its share (budget) is covered."""
    stats = SourceStats(source_name(spec, index))
    units: list[ReadUnit] = read_units(spec, index)
    sizes = np.cumsum([0] + [u.size for u in units])
    filters = data_cfg["filters"]
    writer = SourceCacheWriter(cache_dir, dtype)
    progress = Progress(f"prepare {stats.name}")
    batches = tokenized_batches(
        units, spec.get("text_field", "text"), data_cfg["on_bad_record"], tokenizer, filters["min_chars"], data_cfg["workers"]
    )
    done = False
    for batch in batches:
        values, offsets = _ids_of(batch)
        keys, drops, origins = (batch.column(c).to_pylist() for c in ("key", "drop", "origin"))
        stats.replaced_characters += int(np.asarray(batch.column("replaced")).sum())
        for row, (key, reason) in enumerate(zip(keys, drops)):
            stats.documents_read += 1
            n = int(offsets[row + 1] - offsets[row])
            if not reason and filters["dedup"] and key in seen:
                reason = "duplicate"
            elif not reason and n < filters["min_tokens"]:
                reason = "too_few_tokens"
            if reason:
                stats.drop(reason, origins[row])
                continue
            seen.add(key)
            writer.add(values[offsets[row] : offsets[row + 1]], split_of(key, data_cfg["val_fraction"]) == "val")
            stats.documents_kept += 1
            stats.tokens_kept += n + FRAMING
            # Covered once the documents before this one reach the share: the mixer may take one more.
            if budget is not None and stats.tokens_kept - (n + FRAMING) >= budget:
                done = True
                break
        unit, pos = (int(batch.column(c)[-1].as_py()) for c in ("unit", "pos")) if batch.num_rows else (0, 0)
        fraction = (sizes[unit] + pos) / sizes[-1] if sizes[-1] else None
        if budget:
            fraction = max(fraction or 0, stats.tokens_kept / budget)
        progress.update({"docs": stats.documents_read, "tokens": stats.tokens_kept}, done_fraction=fraction)
        if done:
            break
    if hasattr(batches, "close"):
        batches.close()  # stops the Ray Data pipeline when the share is covered early
    progress.update({"docs": stats.documents_read, "tokens": stats.tokens_kept}, force=True)
    for example in stats.skipped_examples:
        print(f"[prepare] skipped {example}", flush=True)
    return writer.close(), stats


def _check_kept(stats: SourceStats, index: int) -> None:
    """A source that yields nothing is a mistake (a wrong text_field, empty files, too strict filters)."""
    if stats.documents_kept:
        return
    if not stats.documents_read:
        raise no_document_error(stats.name, index)
    reason = max(stats.dropped, key=stats.dropped.get)
    raise ValueError(
        f"data source {stats.name!r} kept none of its {stats.documents_read} documents "
        f"(dropped: {stats.dropped}): {NOTHING_KEPT_HINTS.get(reason, reason)}"
    )


def _write_shards(documents, data_cfg, tokenizer, out, dtype, expected_tokens) -> tuple[dict, dict]:
    """Stage 3: pack mixed documents per split and write the shards."""
    bos, eos = tokenizer.special_ids()
    per_shard = samples_per_shard(data_cfg, dtype)
    packers = {s: Packer(data_cfg["seq_len"], bos, eos, dtype) for s in SPLITS}
    writers = {s: ShardWriter(out, s, per_shard) for s in SPLITS}
    progress = Progress("pack")
    tokens = 0
    for ids, is_val in documents:
        split = "val" if is_val else "train"
        for sample in packers[split].add(ids):
            writers[split].write(sample)
        tokens += len(ids) + FRAMING
        progress.update({"tokens": tokens}, done_fraction=tokens / expected_tokens if expected_tokens else None)
    splits, tails = {}, {}
    for s in SPLITS:
        packers[s].finish()
        tails[s] = packers[s].dropped_tail_tokens
        shards = writers[s].finish()
        splits[s] = {
            "samples": sum(x.samples for x in shards),
            "tokens": sum(x.tokens for x in shards),
            "shards": [asdict(x) for x in shards],
        }
    return splits, tails


def prepare(data_cfg: dict, tokenizer_cfg: dict, force: bool = False,
            before_build: Optional[Callable[[], None]] = None, fingerprint: Optional[str] = None) -> Path:
    """Build (or reuse) the dataset at data_cfg['dir']; returns its directory. `before_build` runs only
    when there is something to build (say, starting Ray for the tokenizer actors). `fingerprint`:
    dataset_fingerprint(data_cfg, tokenizer_cfg) if the caller has just computed it."""
    out = Path(data_cfg["dir"])
    check_replaceable(out)
    fp = fingerprint or dataset_fingerprint(data_cfg, tokenizer_cfg)
    rebuilding = None
    if (out / MANIFEST_NAME).is_file():
        built, why = _built_fingerprint(out)
        if built == fp and not force:
            print(f"[prepare] {out} is up to date (fingerprint {fp[:12]}); nothing to do", flush=True)
            _name_stale_builds(real_destination(out))  # a killed rebuild's may be large
            return out
        rebuilding = f"{out}: prepare.force=true" if built == fp else f"{out} {why}"
    for i, spec in enumerate(data_cfg["sources"]):  # cheap checks of every source, before any work (or Ray)
        check_source(spec, i)
    if tokenizer_cfg["kind"] != "bpe":
        given_tokenizer(tokenizer_cfg)
    if rebuilding:
        print(f"[prepare] {rebuilding}; rebuilding", flush=True)
    if before_build is not None:
        before_build()
    target = real_destination(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(target)
    tmp = target.parent / f".{target.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest = _build(data_cfg, tokenizer_cfg, tmp, fp)
        write_manifest(tmp, manifest)
        swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    splits, stats = manifest["splits"], manifest["stats"]
    print(
        f"[prepare] wrote {out}: {stats['documents_kept']}/{stats['documents_read']} documents kept "
        f"(dropped: {stats['dropped'] or 'none'}), {format_count(stats['tokens'])} tokens, "
        f"{splits['train']['samples']} train / {splits['val']['samples']} val samples of {data_cfg['seq_len'] + 1} tokens",
        flush=True,
    )
    if splits["val"]["samples"] == 0 and data_cfg["val_fraction"] > 0:
        print(f"[prepare] warning: no val sample (data.val_fraction={data_cfg['val_fraction']} of "
              f"{stats['documents_kept']} documents): validation (train.eval_every, eval) needs some; raise "
              "data.val_fraction", flush=True)
    if not data_cfg.get("target_tokens"):
        _note_unheld_weights(stats["sources"])
    return out


def _note_unheld_weights(sources: list[dict]) -> None:
    """Without a target every document is used once, so the shares are the sources' sizes: say so where one
    misses its weight by over a point or a fifth of it, with a target that holds them (each source then covers
    its share in one pass)."""
    mixed = [s for s in sources if s["weight"] > 0]
    if len(mixed) < 2 or all(abs(s["share"] - s["weight"]) <= min(0.01, 0.2 * s["weight"]) for s in mixed):
        return
    shares = ", ".join(f"{s['name']} {s['share']:.1%} (weight {s['weight']:.1%})" for s in mixed)
    most = min(s["tokens_used"] / s["weight"] for s in mixed)
    step = 10 ** max(0, math.floor(math.log10(most)) - 1)  # two significant digits, rounded down
    print(f"[prepare] note: without data.target_tokens every document is used once, so the shares follow the "
          f"sources' sizes: {shares}; data.target_tokens={int(most // step * step)} holds the weights", flush=True)


def _build(data_cfg: dict, tokenizer_cfg: dict, tmp: Path, fp: str) -> dict:
    sources = data_cfg["sources"]
    names = [source_name(s, i) for i, s in enumerate(sources)]
    shares = normalised_weights([s.get("weight", 1.0) for s in sources])
    target = data_cfg.get("target_tokens")
    tokenizer = build_tokenizer(data_cfg, tokenizer_cfg)
    tokenizer.save(tmp)
    dtype = token_dtype(tokenizer.vocab_size)

    seen: set[bytes] = set()
    caches, source_stats = [], []
    for i, spec in enumerate(sources):
        if shares[i] == 0:  # weight 0: never mixed, so not read at all
            caches.append(SourceCacheWriter(tmp / "cache" / str(i), dtype).close())
            source_stats.append(SourceStats(names[i]))
            continue
        budget = shares[i] * target if target and not spec.get("repeat") else None
        cache, stats = _cache_source(i, spec, tokenizer, data_cfg, tmp / "cache" / str(i), dtype, budget, seen)
        _check_kept(stats, i)
        if budget is not None and stats.tokens_kept < budget:  # known now, before tokenizing the other sources
            raise SourceExhausted(
                f"data source {names[i]!r} holds {stats.tokens_kept:,} tokens after filtering, short of its share "
                f"of {budget:,.0f} of data.target_tokens={target:,}; let it be read again (data.sources.{i}.repeat=true"
                f"), or lower the target or its weight (data.sources.{i}.weight)"
            )
        caches.append(cache)
        source_stats.append(stats)

    documents, mix_stats = mix(caches, [s.get("weight", 1.0) for s in sources], names, [bool(s.get("repeat")) for s in sources], target)
    expected = target or sum(s.tokens_kept for s in source_stats)
    splits, tails = _write_shards(documents, data_cfg, tokenizer, tmp, dtype, expected)
    shutil.rmtree(tmp / "cache")
    if splits["train"]["samples"] == 0:
        val_tokens = splits["val"]["tokens"] + tails["val"]
        if val_tokens > tails["train"]:  # the documents went to val (whole documents are drawn for it)
            raise ValueError(
                f"the corpus gives {tails['train']:,} training tokens and {val_tokens:,} val tokens, fewer than "
                f"one training sample of data.seq_len+1 = {data_cfg['seq_len'] + 1}: lower "
                f"data.val_fraction={data_cfg['val_fraction']} or add documents"
            )
        raise ValueError(
            f"the corpus gives {tails['train']:,} training tokens, fewer than one sample of data.seq_len+1 = "
            f"{data_cfg['seq_len'] + 1}: lower data.seq_len or "
            + (f"raise data.target_tokens={target:,}" if target else "add documents")
        )
    bos, eos = tokenizer.special_ids()
    dropped: dict[str, int] = {}
    for s in source_stats:
        for reason, n in s.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + n
    return {
        "seq_len": data_cfg["seq_len"],
        "dtype": dtype.name,
        "tokenizer": {
            "file": tokenizer.file_name,
            "kind": tokenizer.kind,
            "fingerprint": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size,
            "bos_id": bos,
            "eos_id": eos,
        },
        "source": {"spec": sources, "fingerprint": fp},
        "stats": {
            "documents_read": sum(s.documents_read for s in source_stats),
            "documents_kept": sum(s.documents_kept for s in source_stats),
            "dropped": dropped,
            "replaced_characters": sum(s.replaced_characters for s in source_stats),
            "tokens": sum(mix_stats.tokens),
            "dropped_tail_tokens": tails,
            "sources": [
                {
                    **asdict(s),
                    "weight": shares[i],
                    "tokens_used": mix_stats.tokens[i],
                    "share": mix_stats.shares[i],
                    "repeats": mix_stats.repeats[i],
                }
                for i, s in enumerate(source_stats)
            ],
        },
        "splits": splits,
    }


def describe_plan(data_cfg: dict, tokenizer_cfg: dict, force: bool = False) -> str:
    """What prepare would read and write, checked without writing anything or contacting a hub."""
    sources = data_cfg["sources"]
    shares = normalised_weights([s.get("weight", 1.0) for s in sources])
    target = data_cfg.get("target_tokens")
    check_replaceable(Path(data_cfg["dir"]))
    lines = [f"[prepare] plan for dataset {data_cfg['name']!r} -> {data_cfg['dir']}"]
    lines.append(f"  target tokens: {format_count(target) if target else 'all documents of every source'}")
    for i, spec in enumerate(sources):
        if spec.get("hf") and saved_to_disk(spec["hf"]):
            check_saved_dataset(spec, i)
            where = f"dataset directory {spec['hf']} (save_to_disk), split {spec.get('hf_split', 'train')}"
        elif spec.get("hf"):
            files = f", files {spec['hf_data_files']}" if spec.get("hf_data_files") else ""
            where = f"Hugging Face {spec['hf']} (config {spec.get('hf_config')}, split {spec.get('hf_split', 'train')}{files}), streamed"
        else:
            files = check_files(spec, i)
            where = f"{len(files)} file(s), {sum(os.path.getsize(f) for f in files) / 1e6:.1f} MB"
            if spec.get("separator") is not None:
                where += f", .txt documents split at {document_separator(spec)!r}"
        want = f", {format_count(shares[i] * target)} tokens" if target else ""
        repeat = ", may repeat" if spec.get("repeat") else ""
        lines.append(f"  {source_name(spec, i)}: weight {shares[i]:.2%}{want}{repeat}: {where}")
    if tokenizer_cfg["kind"] != "bpe":
        given_tokenizer(tokenizer_cfg)
    tok = tokenizer_cfg.get("path") if tokenizer_cfg["kind"] != "bpe" else f"BPE trained on the corpus, vocab {tokenizer_cfg['vocab_size']}"
    f = data_cfg["filters"]
    lines.append(f"  tokenizer: {tok}")
    lines.append(f"  filters: min {f['min_chars']} characters, min {f['min_tokens']} tokens, dedup {'on' if f['dedup'] else 'off'}")
    per_shard = data_cfg.get("shard_bytes") and f"{format_count(data_cfg['shard_bytes'])}B" or f"{data_cfg['samples_per_shard']} samples"
    lines.append(f"  samples of {data_cfg['seq_len'] + 1} tokens, {per_shard} per shard, {data_cfg['val_fraction'] * 100:.3g}% of documents to val")
    if (Path(data_cfg["dir"]) / MANIFEST_NAME).is_file():
        built, why = _built_fingerprint(Path(data_cfg["dir"]))
        fresh = built == dataset_fingerprint(data_cfg, tokenizer_cfg)
        state = "up to date, but prepare.force: would rebuild" if fresh and force else "up to date" if fresh else \
            f"{why}: would rebuild"
        lines.append(f"  existing dataset: {state}")
    return "\n".join(lines)


def _built_fingerprint(out: Path) -> tuple[Optional[str], str]:
    """(fingerprint of the dataset in out, what to say if it is not this build's); an unreadable manifest
    (corrupt, or another format_version) only means a rebuild: prepare is how such a dataset is fixed."""
    try:
        return read_manifest(out).fingerprint, "was built from other inputs or settings"
    except ValueError as e:
        return None, f"cannot be reused ({e})"


# What a prepared dataset holds: a directory of only these (its manifest unreadable, say) is still one.
DATASET_ENTRIES = {MANIFEST_NAME, "train", "val", "tokenizer.json", "tokenizer.model"}


def check_replaceable(out: Path) -> None:
    """A build replaces data.dir as a whole: refuse when it holds something other than a dataset (nothing
    but a dataset's entries, or a manifest that is ours: another tool's manifest.json is not)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"data.dir {out} is a file, not a directory: choose another data.dir (or data.name)")
    if not out.is_dir():
        return
    entries, manifest = {p.name for p in out.iterdir()}, out / MANIFEST_NAME
    if not entries or _is_our_manifest(manifest) or (entries <= DATASET_ENTRIES and manifest.is_file()):
        return
    why = "its manifest.json is not elmforge's" if manifest.is_file() else f"no {MANIFEST_NAME}"
    raise ValueError(
        f"data.dir {out} exists and is not a prepared dataset ({why}); prepare would replace it "
        "with the dataset and delete what it holds: choose another data.dir (or data.name), or empty it"
    )


def _is_our_manifest(path: Path) -> bool:
    """A manifest.json elmforge wrote (of any format_version), whatever else is wrong with the dataset."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "format_version" in data and "splits" in data


def _stale_builds(out: Path) -> list[Path]:
    """Temporary directories of earlier builds on this machine that were killed (their process is gone).
    Another machine's (storage shared between nodes) may still be written: its process cannot be seen."""
    prefix, stale = f".{out.name}.tmp-", []
    for build in out.parent.glob(f"{glob.escape(prefix)}*"):  # a name may hold [ ] * ?
        host, _, pid = build.name[len(prefix):].rpartition("-")
        if not pid.isdigit() or host not in ("", socket.gethostname()):  # not ours, or another machine's
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            stale.append(build)
        except PermissionError:  # alive, another user's
            pass
    return stale


def _remove_stale_builds(out: Path) -> None:
    remove_leftovers(out)
    for stale in _stale_builds(out):
        shutil.rmtree(stale, ignore_errors=True)


def _name_stale_builds(out: Path) -> None:
    """Said, not deleted, by a prepare with nothing to build: a process of another pid namespace with this
    host name (a container on a shared volume) looks dead from here, and its build may be live; a
    prepare that builds removes them, as it must replace the dataset alone anyway."""
    for stale in _stale_builds(out):
        print(f"[prepare] {stale} is left from a build that was killed (or runs in another container): delete "
              "it, or the next build of this dataset will", flush=True)

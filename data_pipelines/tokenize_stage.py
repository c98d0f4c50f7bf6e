"""Read, clean, filter and tokenize one source's documents, in order, in parallel.

With `workers=0` everything runs in this process; otherwise it is a Ray Data
pipeline: read tasks (one per read unit) feed a pool of tokenizer actors, with
order preserved, so the output is identical whatever the number of workers.
Either way the result is a stream of pyarrow tables with one row per record:
ids (token ids, empty when dropped), key (dedup digest), drop (reason or ""),
origin, replaced (non-UTF-8 characters replaced), unit (read-unit index).
"""

import logging
import os
import warnings
from functools import partial
from typing import Iterator

import pyarrow as pa

from data_pipelines.cleaning import clean_text, dedup_key, filter_length
from data_pipelines.sources import ReadUnit, read_unit
from data_pipelines.tokenizer import TextTokenizer

BATCH = 1024



def record_tables(unit_index: int, units: list[ReadUnit], text_field: str, on_bad_record: str) -> Iterator[pa.Table]:
    """Records of one read unit as tables of up to BATCH rows; a bad record has `bad` set (or raises)."""
    columns: dict[str, list] = {"text": [], "bad": [], "origin": [], "replaced": []}

    def table() -> pa.Table:
        t = pa.table({**columns, "unit": [unit_index] * len(columns["text"])})
        for c in columns.values():
            c.clear()
        return t

    for record in read_unit(units[unit_index], text_field):
        if record.bad and on_bad_record == "error":
            raise ValueError(f"{record.origin}: bad record ({record.bad}); set data.on_bad_record=skip to skip such records")
        columns["text"].append(record.text or "")
        columns["bad"].append(record.bad)
        columns["origin"].append(record.origin)
        columns["replaced"].append(record.replaced)
        if len(columns["text"]) == BATCH:
            yield table()
    if columns["text"]:
        yield table()


def _read_stage(batch: pa.Table, units, text_field, on_bad_record) -> Iterator[pa.Table]:
    """Ray Data read step: one input row per read unit, many output tables."""
    for unit_index in batch.column("unit").to_pylist():
        yield from record_tables(unit_index, units, text_field, on_bad_record)


class DocumentProcessor:
    """Cleans, length-filters and tokenizes a batch of rows (a Ray Data actor, or called in-process)."""

    def __init__(self, tokenizer: TextTokenizer, min_chars: int, threads: int | None = None):
        if threads:  # one Rust thread per actor: the pool, not each tokenizer, spreads over the cores
            os.environ["RAYON_NUM_THREADS"] = str(threads)
        self.tokenizer, self.min_chars = tokenizer, min_chars

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts, bad = batch.column("text").to_pylist(), batch.column("bad").to_pylist()
        drops, keys, kept = [], [], []
        for i, (text, reason) in enumerate(zip(texts, bad)):
            key = b""
            if not reason:
                text = clean_text(text)
                if not text.strip():
                    reason = "empty"
                elif self.min_chars and filter_length(text) < self.min_chars:
                    reason = "too_few_characters"
                else:
                    key = dedup_key(text)
                    kept.append((i, text))
            drops.append(reason)
            keys.append(key)
        ids = [[] for _ in texts]
        for (i, _), encoded in zip(kept, self.tokenizer.encode_batch([t for _, t in kept])):
            ids[i] = encoded
        return pa.table(
            {
                "ids": pa.array(ids, type=pa.list_(pa.uint32())),
                "key": pa.array(keys, type=pa.binary()),
                "drop": pa.array(drops, type=pa.string()),
                "origin": batch.column("origin").cast(pa.string()),
                "replaced": batch.column("replaced").cast(pa.int64()),
                "unit": batch.column("unit").cast(pa.int64()),
            }
        )


def _in_process(units, text_field, on_bad_record, processor) -> Iterator[pa.Table]:
    for i in range(len(units)):
        for table in record_tables(i, units, text_field, on_bad_record):
            yield processor(table)


def _unwrap(error: BaseException) -> BaseException:
    """The user-facing error inside Ray's task/actor wrappers, if there is one."""
    seen = error
    while seen is not None:
        if isinstance(seen, (ValueError, FileNotFoundError)) and "ray" not in type(seen).__module__:
            return seen
        cause = getattr(seen, "cause", None)
        seen = cause if isinstance(cause, BaseException) else (seen.__cause__ or seen.__context__)
    return error


def _with_ray(units, text_field, on_bad_record, tokenizer, min_chars, workers) -> Iterator[pa.Table]:
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # output order = input order, whatever the pool size
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*minimum number of concurrent actors", category=UserWarning)
    if workers is None:
        workers = max(1, int(ray.cluster_resources().get("CPU", 2)) - 1)
    ds = ray.data.from_items([{"unit": i} for i in range(len(units))], override_num_blocks=len(units))
    ds = ds.map_batches(
        partial(_read_stage, units=units, text_field=text_field, on_bad_record=on_bad_record),
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=0.25,  # mostly I/O; different resources also keep Ray from fusing it into the actors
    )
    ds = ds.map_batches(
        DocumentProcessor,
        fn_constructor_kwargs={"tokenizer": tokenizer, "min_chars": min_chars, "threads": 1},
        batch_size=BATCH,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=workers),
    )
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield batch
    except Exception as e:
        inner = _unwrap(e)
        if inner is e:
            raise
        raise type(inner)(str(inner)) from None


def tokenized_batches(
    units: list[ReadUnit], text_field: str, on_bad_record: str, tokenizer: TextTokenizer, min_chars: int, workers
) -> Iterator[pa.Table]:
    """Processed rows of the given read units, in order. workers: 0 = in-process, None = all Ray CPUs."""
    if workers == 0:
        return _in_process(units, text_field, on_bad_record, DocumentProcessor(tokenizer, min_chars))
    return _with_ray(units, text_field, on_bad_record, tokenizer, min_chars, workers)

"""Read, clean, filter and tokenize one source's documents, in order, in parallel.

With `workers=0` everything runs in this process (helper threads read, clean and
tokenize ahead of the caller); otherwise it is a Ray Data
pipeline: read tasks (one per read unit) feed a pool of tokenizer actors, with
order preserved, so the output is identical whatever the number of workers.
Either way the result is a stream of pyarrow tables with one row per record:
ids (token ids, empty when dropped), key (dedup digest), drop (reason or ""),
origin, replaced (non-UTF-8 characters replaced), unit (read-unit index), pos (bytes of the unit
read so far, for progress).
"""

import logging
import os
import queue
import threading
import warnings
from functools import partial
from itertools import chain
from typing import Iterator

import numpy as np
import pyarrow as pa

from data_pipelines.cleaning import clean_text, dedup_key, filter_length
from data_pipelines.sources import ReadUnit, bad_record_error, read_unit
from data_pipelines.tokenizer import TextTokenizer

BATCH = 1024
PREFETCH = 2  # in-process: processed batches made ahead of the caller
# Ray Data: block size, object-store budget (blocks per actor, at least MIN_STORE_BUDGET), read tasks.
BLOCK_BYTES = 4 << 20
STORE_BLOCKS_PER_ACTOR = 8
MIN_STORE_BUDGET = 128 << 20
ACTORS_PER_READER = 16
READER_CPUS = 0.25


def record_tables(unit_index: int, units: list[ReadUnit], text_field: str, on_bad_record: str) -> Iterator[pa.Table]:
    """Records of one read unit as tables of up to BATCH rows; a bad record has `bad` set (or raises)."""
    columns: dict[str, list] = {"text": [], "bad": [], "origin": [], "replaced": [], "pos": []}

    def table() -> pa.Table:
        t = pa.table({**columns, "unit": [unit_index] * len(columns["text"])})
        for c in columns.values():
            c.clear()
        return t

    for record in read_unit(units[unit_index], text_field):
        if record.bad and on_bad_record == "error":
            raise bad_record_error(record)
        columns["text"].append(record.text or "")
        columns["bad"].append(record.bad)
        columns["origin"].append(record.origin)
        columns["replaced"].append(record.replaced)
        columns["pos"].append(record.pos)
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
        return self.tokenize(self.clean(batch))

    def clean(self, batch: pa.Table) -> tuple[pa.Table, list[tuple[int, str]], list[bytes], list[str]]:
        """First half (Python, holds the GIL): (batch, kept (row, cleaned text), dedup keys, drop reasons)."""
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
        return batch, kept, keys, drops

    def tokenize(self, cleaned: tuple[pa.Table, list[tuple[int, str]], list[bytes], list[str]]) -> pa.Table:
        """Second half (mostly the tokenizer, which releases the GIL): the output table."""
        batch, kept, keys, drops = cleaned
        return pa.table(
            {
                "ids": self._ids_column(batch.num_rows, kept),
                "key": pa.array(keys, type=pa.binary()),
                "drop": pa.array(drops, type=pa.string()),
                "origin": batch.column("origin").cast(pa.string()),
                "replaced": batch.column("replaced").cast(pa.int64()),
                "unit": batch.column("unit").cast(pa.int64()),
                "pos": batch.column("pos").cast(pa.int64()),
            }
        )

    def _ids_column(self, rows: int, kept: list[tuple[int, str]]) -> pa.ListArray:
        """Token ids of the kept rows (empty lists elsewhere), built from flat arrays, not per-row lists."""
        encoded = encode_texts(self.tokenizer, [t for _, t in kept])
        lengths = np.zeros(rows, dtype=np.int64)
        lengths[[i for i, _ in kept]] = [len(ids) for ids in encoded]
        offsets = np.zeros(rows + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        values = np.fromiter(chain.from_iterable(encoded), dtype=np.uint32, count=int(offsets[-1]))
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def encode_texts(tokenizer: TextTokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, as TextTokenizer.encode_batch gives them.

    A Hugging Face tokenizer uses `encode_batch_fast` where it exists: the same ids
    without computing character offsets, which we never use (about 15% less work).
    """
    if tokenizer.kind == "hf" and hasattr(tokenizer.impl, "encode_batch_fast"):
        return [e.ids for e in tokenizer.impl.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer.encode_batch(texts)


def _in_process(units, text_field, on_bad_record, processor) -> Iterator[pa.Table]:
    """The processed batches in order, made by two helper threads running ahead of the caller.

    One thread reads and cleans, the other tokenizes. The tokenizer releases the GIL while it
    encodes on all cores, so the Python work (reading and cleaning the next batches, the
    caller's caching and dedup) runs meanwhile instead of leaving the cores idle.
    """
    records = (table for i in range(len(units)) for table in record_tables(i, units, text_field, on_bad_record))
    cleaned = _ahead(lambda: map(processor.clean, records), "elmforge-clean")
    return _ahead(lambda: map(processor.tokenize, cleaned), "elmforge-tokenize", upstream=cleaned)


def _ahead(make_items, name: str, upstream=None) -> Iterator:
    """Iterate make_items() in a helper thread, up to PREFETCH items ahead of the caller.

    Order is kept; an exception in the thread is raised in the caller; closing the returned
    generator (or dropping it) stops the thread, and then `upstream`.
    """
    results: queue.Queue = queue.Queue(maxsize=PREFETCH)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                results.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in make_items():
                if not put(("item", item)):
                    return
            put(("done", None))
        except BaseException as e:  # handed to the caller, raised there
            put(("error", e))
        finally:
            if upstream is not None:
                upstream.close()

    def consume() -> Iterator:
        thread = threading.Thread(target=produce, name=name, daemon=True)
        thread.start()
        try:
            while True:
                kind, value = results.get()
                if kind == "done":
                    return
                if kind == "error":
                    raise value
                yield value
        finally:
            stop.set()
            thread.join()

    return consume()


def _unwrap(error: BaseException) -> BaseException:
    """The user-facing error inside Ray's task/actor wrappers, if there is one."""
    seen = error
    while seen is not None:
        if isinstance(seen, (ValueError, FileNotFoundError)) and "ray" not in type(seen).__module__:
            return seen
        cause = getattr(seen, "cause", None)
        seen = cause if isinstance(cause, BaseException) else (seen.__cause__ or seen.__context__)
    return error


def _without_ray(error: BaseException) -> BaseException:
    """The error as a plain one of its type, off Ray's wrappers and without the lines Ray Data adds to
    its message (advice on retrying "transient" errors); ValueError where its type takes more than a
    message to build (UnicodeEncodeError, json.JSONDecodeError)."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    try:
        return type(error)(message)
    except TypeError:
        return ValueError(message)


def _require_room(workers: int, cpus: float, can_grow: bool = False) -> None:
    """The actor pool is placed whole before a reader runs, and then at least one reader must fit beside
    it: without that room the build waits, without a word, forever on a one-node Ray here. A cluster of
    several nodes may grow (an autoscaler), so there it is said and Ray waits."""
    needed = workers + READER_CPUS
    if needed <= cpus:
        return
    short = (f"data.workers={workers} tokenizer actors of 1 CPU and a reader of {READER_CPUS} need {needed:g} CPUs, "
             f"more than the {cpus:g} this Ray has")
    fix = "lower data.workers (or leave it null, for Ray's CPUs less one), or give Ray more"
    if can_grow:
        print(f"[prepare] {short}: Ray waits for more (an autoscaler may add nodes); if none will come, stop and "
              f"{fix}", flush=True)
        return
    raise ValueError(f"{short}: {fix} (cluster.num_cpus for the embedded one)")


def _one_node_here() -> bool:
    """Ray is one node, this machine's (an embedded Ray, or a one-node cluster started here)."""
    import ray

    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        return len(nodes) == 1 and nodes[0]["NodeID"] == ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - Ray client mode and the like: not known to be here
        return False


def default_workers() -> int:
    """Tokenizer actors for data.workers=null: Ray's CPUs less one (for the reader and the driver), but
    on a one-node Ray on this machine no more than its cores: an embedded Ray is given more logical
    CPUs than cores (so training workers fit), and a third single-threaded actor on two cores only
    adds a process (memory, Ray overhead) without adding throughput."""
    import ray

    workers = max(1, int(ray.cluster_resources().get("CPU", 2)) - 1)
    return min(workers, len(os.sched_getaffinity(0))) if _one_node_here() else workers


def _with_ray(units, text_field, on_bad_record, tokenizer, min_chars, workers) -> Iterator[pa.Table]:
    import ray
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Our own progress line replaces Ray Data's bars; its warning that they are off is noise.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*minimum number of concurrent actors", category=UserWarning)
    if workers is None:
        workers = default_workers()
    readers = -(-workers // ACTORS_PER_READER)
    _require_room(workers, ray.cluster_resources().get("CPU", 0), can_grow=not _one_node_here())
    ds = ray.data.from_items([{"unit": i} for i in range(len(units))], override_num_blocks=len(units))
    ctx = ds.context  # this pipeline's own copy of the DataContext; the process-wide one is left alone
    ctx.execution_options.preserve_order = True  # output order = input order, whatever the pool size
    ctx.enable_progress_bars = False
    # Blocks of about one batch: a read task's output is cut into blocks of this size as it
    # streams (Ray's default, 128 MiB, would hand a whole file to a single actor), and the
    # object store holds a bounded number of them (else reading runs ahead of tokenizing).
    ctx.target_max_block_size = BLOCK_BYTES
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=max(MIN_STORE_BUDGET, STORE_BLOCKS_PER_ACTOR * BLOCK_BYTES * workers)
    )
    ds = ds.map_batches(
        partial(_read_stage, units=units, text_field=text_field, on_bad_record=on_bad_record),
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=READER_CPUS,  # mostly I/O; different resources also keep Ray from fusing it into the actors
        # Reading is a few % of the work; each reader is a process.
        compute=ray.data.TaskPoolStrategy(size=readers),
    )
    with warnings.catch_warnings():
        # max_restarts goes through map_batches' **ray_remote_args, deprecated from Ray 2.60 with no other way
        # to give it: ray_remote_args_fn's value comes after Ray's defaults (restarts on) are applied.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ds.map_batches(
            DocumentProcessor,
            fn_constructor_kwargs={"tokenizer": tokenizer, "min_chars": min_chars, "threads": 1},
            batch_size=BATCH,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=workers),
            # Ray Data restarts actors that die, but one built from arguments in the object store (the
            # tokenizer) may not come back (ray-project/ray#53727, which Ray logs as an error at every build):
            # a lost actor fails the build instead, which the next prepare builds again.
            max_restarts=0,
        )
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield batch
    except Exception as e:
        inner = _unwrap(e)
        if inner is e:
            raise
        raise _without_ray(inner) from None


def tokenized_batches(
    units: list[ReadUnit], text_field: str, on_bad_record: str, tokenizer: TextTokenizer, min_chars: int, workers
) -> Iterator[pa.Table]:
    """Processed rows of the given read units, in order. workers: 0 = in-process, None = all Ray CPUs."""
    if workers == 0:
        return _in_process(units, text_field, on_bad_record, DocumentProcessor(tokenizer, min_chars))
    return _with_ray(units, text_field, on_bad_record, tokenizer, min_chars, workers)

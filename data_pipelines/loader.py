"""Streaming loader over prepared shards: equal samples per rank, seeded shuffle, exact resume.

Each epoch has a seeded permutation of all sample indices (the manifest knows
every count). Rank r of W takes permuted positions r, r+W, r+2W, ...; the tail
that does not divide by W is dropped, so every rank gets N // W samples. A
rank's samples form one endless stream across epochs, cut into micro-batches;
DataLoader worker w of K makes batches w, w+K, ... so the order never depends
on K. The whole state is the stream offset, reported as (epoch, position).
"""

import atexit
import signal
import weakref
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipelines.integrity import check_tokenizer
from data_pipelines.manifest import Manifest, read_manifest, rebuilt_error
from data_pipelines.shard_index import SampleIndex


class RankBatches(IterableDataset):
    """Micro-batches (B, seq_len+1) of one rank's sample stream, from a given stream offset."""

    def __init__(self, manifest: Manifest, split: str, rank: int, world_size: int, batch_size: int, seed: int,
                 shuffle: bool):
        # The manifest as the run started: a shard first opened after a rebuild in place is refused.
        self.manifest, self.split, self.rank, self.world_size = manifest, split, rank, world_size
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        n = manifest.num_samples(split)
        self.per_rank = n // world_size
        if n == 0:
            fix = " (raise data.val_fraction and prepare it again)" if split == "val" else ""
            raise ValueError(f"split {split!r} of {manifest.root} has no sample{fix}")
        if self.per_rank == 0:
            raise ValueError(f"split {split!r} of {manifest.root} has {n} samples, fewer than the {world_size} ranks")
        self.start = 0  # stream offset (samples already consumed by this rank)

    def _rank_order(self, epoch: int, n: int) -> np.ndarray:
        """The sample indices this rank reads in `epoch`: its share of a seeded permutation of all n.
        The permutation is numpy's permutation(n), shuffled in 32-bit integers where they suffice (the
        same order, half the memory), and only this rank's share is kept through the epoch."""
        order = np.arange(n, dtype=np.uint32 if n < 2**32 else np.int64)
        if self.shuffle:
            np.random.default_rng([self.seed, epoch]).shuffle(order)
        return order[self.rank :: self.world_size][: self.per_rank].copy()

    def __iter__(self) -> Iterator[torch.Tensor]:
        index = SampleIndex(self.manifest, self.split)
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        order, order_epoch = None, -1
        batch_no = worker
        while True:
            first = self.start + batch_no * self.batch_size
            rows = []
            for t in range(first, first + self.batch_size):
                epoch, pos = divmod(t, self.per_rank)
                if epoch != order_epoch:
                    order, order_epoch = self._rank_order(epoch, index.num_samples), epoch
                rows.append(index[int(order[pos])])
            yield torch.from_numpy(np.stack(rows, dtype=np.int64))
            batch_no += num_workers


def _stopping_is_the_trainers(_worker_id: int) -> None:
    """A loader worker ignores SIGTERM and SIGINT: sent to the whole process group (by `timeout`, systemd,
    Slurm at a time limit), they would kill it, and torch would then fail the training step; the training
    process turns them into a checkpoint and a stop, and its workers end with it (TokenLoader.close)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _close_if_alive(loader: "weakref.ref[TokenLoader]") -> None:
    if (alive := loader()) is not None:
        alive.close()


def _unwrapped(error: Exception) -> Exception:
    """An error in a worker process reaches the trainer as "Caught ValueError in DataLoader worker process 0.
    Original Traceback ...": the original's one line (a damaged shard's name and fix) is what to say."""
    text, marker = str(error), f"\n{type(error).__name__}: "
    if not text.startswith("Caught ") or marker not in text:
        return error
    try:
        return type(error)(text.rsplit(marker, 1)[1].strip())
    except Exception:  # noqa: BLE001 - a type that takes other arguments: keep torch's
        return error


class TokenLoader:
    """Endless iterator of micro-batches for one rank, with state_dict()/load_state_dict()."""

    def __init__(
        self, root, split, rank, world_size, batch_size, seed, shuffle=True, num_workers=0, tokenizer_fingerprint=None,
        dataset_fingerprint=None,
    ):
        manifest = read_manifest(root)
        check_tokenizer(manifest, tokenizer_fingerprint)
        if dataset_fingerprint and manifest.fingerprint != dataset_fingerprint:  # a run's validation, after a rebuild in place
            raise rebuilt_error(manifest.root, split,
                                f"fingerprint {dataset_fingerprint[:12]}, now {str(manifest.fingerprint)[:12]}")
        self.dataset = RankBatches(manifest, split, rank, world_size, batch_size, seed, shuffle)
        self.num_workers = num_workers
        self.consumed = 0  # samples this rank has yielded, across epochs
        self._iter = None
        if num_workers:
            # multiprocessing's own stop at interpreter exit (SIGTERM, then wait) would wait forever for
            # workers that ignore SIGTERM: a loader still open then (an error on its way out) stops first.
            atexit.register(_close_if_alive, weakref.ref(self))

    def close(self) -> None:
        """Stop the worker processes (torch's shutdown: they finish and exit; no signal needed)."""
        iterator, self._iter = self._iter, None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    @property
    def seq_len(self) -> int:
        return self.dataset.manifest.seq_len

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self._iter is None:
            self.dataset.start = self.consumed
            loader = DataLoader(
                self.dataset, batch_size=None, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                worker_init_fn=_stopping_is_the_trainers,
            )
            self._iter = iter(loader)
        try:
            batch = next(self._iter)
        except Exception as e:  # noqa: BLE001 - re-raised as it is, less torch's wrapping
            raise _unwrapped(e) from None
        self.consumed += batch.shape[0]
        return batch

    def state_dict(self) -> dict:
        epoch, position = divmod(self.consumed, self.dataset.per_rank)
        return {"epoch": epoch, "position": position, "world_size": self.dataset.world_size}

    def load_state_dict(self, state: dict) -> int:
        """Continue from a saved position, also one saved with another number of ranks: W ranks at
        position p have read the epoch's first W * p permuted samples, whatever W (the epoch's dropped
        tail aside, which depends on W), so the position moves to W * p / this run's ranks. Past an
        epoch's end a step's samples straddle two epochs, and W * p may not divide: the new ranks then
        start at the next sample they can share, and the samples skipped (fewer than the ranks) are
        returned; none is read twice. Where the old ranks read into what is, for the new ones, the
        epoch's dropped tail, the epoch is done: they go on at the next one's start, nothing skipped."""
        epoch, position, world_size = state["epoch"], state["position"], self.dataset.world_size
        skipped = 0
        if state["world_size"] != world_size:
            read = state["world_size"] * position
            position = -(-read // world_size)
            if position > self.dataset.per_rank:
                epoch, position = epoch + 1, 0
            else:
                skipped = position * world_size - read
        self.consumed = epoch * self.dataset.per_rank + position
        self.close()
        return skipped

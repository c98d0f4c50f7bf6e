import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipelines.loader import TokenLoader
from data_pipelines.manifest import read_manifest


def take(loader, n_batches):
    return [b.clone() for b in itertools.islice(loader, n_batches)]


def rows(batches):
    return [tuple(r.tolist()) for b in batches for r in b]


def test_every_rank_gets_the_same_count_and_ranks_never_overlap(tiny_dataset):
    n = read_manifest(tiny_dataset).num_samples("train")
    world = 3
    per_rank = n // world
    seen = []
    for rank in range(world):
        loader = TokenLoader(tiny_dataset, "train", rank, world, batch_size=1, seed=5)
        got = rows(take(loader, per_rank))
        assert len(got) == per_rank
        seen += got
    # Equal shares, no sample twice, and only the tail (< world) left out.
    everything = rows(take(TokenLoader(tiny_dataset, "train", 0, 1, batch_size=1, seed=5), n))
    assert len(set(seen)) == len(seen) == world * per_rank
    assert set(seen) <= set(everything) and len(set(everything)) - len(set(seen)) < world


def test_batches_have_the_sample_shape(tiny_dataset):
    batch = next(TokenLoader(tiny_dataset, "train", 0, 2, batch_size=4, seed=0))
    assert batch.shape == (4, 33) and batch.dtype == torch.int64


def test_one_rank_with_accumulation_two_sees_what_two_ranks_see(tiny_dataset):
    single = rows(take(TokenLoader(tiny_dataset, "train", 0, 1, batch_size=2, seed=1), 6))
    pair = [TokenLoader(tiny_dataset, "train", r, 2, batch_size=2, seed=1) for r in range(2)]
    per_step_pair = []
    for _ in range(3):
        per_step_pair.append(set(rows([next(pair[0]), next(pair[1])])))
    per_step_single = [set(single[i * 4 : (i + 1) * 4]) for i in range(3)]
    assert per_step_single == per_step_pair


@pytest.mark.parametrize("workers", [0, 2])
def test_order_does_not_depend_on_dataloader_workers(tiny_dataset, workers):
    ref = take(TokenLoader(tiny_dataset, "train", 1, 2, batch_size=3, seed=7, num_workers=0), 8)
    got = take(TokenLoader(tiny_dataset, "train", 1, 2, batch_size=3, seed=7, num_workers=workers), 8)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


@pytest.mark.parametrize("workers", [0, 2])
def test_restored_loader_continues_exactly(tiny_dataset, workers):
    n = read_manifest(tiny_dataset).num_samples("train")
    per_rank = n // 2
    total = per_rank // 3 + 4  # runs past the epoch boundary
    full = take(TokenLoader(tiny_dataset, "train", 0, 2, batch_size=3, seed=2, num_workers=workers), total)
    first = TokenLoader(tiny_dataset, "train", 0, 2, batch_size=3, seed=2, num_workers=workers)
    take(first, 5)
    state = first.state_dict()
    assert state == {"epoch": 0, "position": 15, "world_size": 2}
    resumed = TokenLoader(tiny_dataset, "train", 0, 2, batch_size=3, seed=2, num_workers=workers)
    resumed.load_state_dict(state)
    rest = take(resumed, total - 5)
    assert all(torch.equal(a, b) for a, b in zip(full[5:], rest))
    assert resumed.state_dict()["epoch"] == 1


def test_each_epoch_is_reshuffled_with_the_seed(tiny_dataset):
    n = read_manifest(tiny_dataset).num_samples("train")
    stream = rows(take(TokenLoader(tiny_dataset, "train", 0, 1, batch_size=1, seed=3), 2 * n))
    epoch0, epoch1 = stream[:n], stream[n:]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
    other_seed = rows(take(TokenLoader(tiny_dataset, "train", 0, 1, batch_size=1, seed=4), n))
    assert other_seed != epoch0


@pytest.mark.parametrize("saved_world, world", [(2, 1), (1, 2), (2, 4)])
def test_a_position_saved_by_other_ranks_continues_with_the_same_samples_per_step(tiny_dataset, saved_world, world):
    global_batch = 4  # samples per optimizer step, over all ranks
    saved = [TokenLoader(tiny_dataset, "train", r, saved_world, batch_size=global_batch // saved_world, seed=6)
             for r in range(saved_world)]
    for loader in saved:
        take(loader, 3)  # three steps
    uninterrupted = [set(rows([next(loader) for loader in saved])) for _ in range(4)]
    resumed = [TokenLoader(tiny_dataset, "train", r, world, batch_size=global_batch // world, seed=6)
               for r in range(world)]
    for loader in resumed:
        loader.load_state_dict({"epoch": 0, "position": 3 * global_batch // saved_world, "world_size": saved_world})
    assert [set(rows([next(loader) for loader in resumed])) for _ in range(4)] == uninterrupted


def test_past_an_epoch_end_a_position_that_does_not_divide_skips_fewer_samples_than_the_ranks(tiny_dataset):
    # A step's samples straddle the epoch's end: 1 rank saved at epoch 1, position 5 (5 samples read).
    one = TokenLoader(tiny_dataset, "train", 0, 1, batch_size=1, seed=0)
    per_rank = one.dataset.per_rank
    epoch1 = rows(take(one, per_rank + 10))[per_rank:]  # epoch 1's first 10 samples, in its order
    resumed = [TokenLoader(tiny_dataset, "train", r, 2, batch_size=1, seed=0) for r in range(2)]
    skipped = [loader.load_state_dict({"epoch": 1, "position": 5, "world_size": 1}) for loader in resumed]
    assert skipped == [1, 1]  # the sixth: two ranks go on from the seventh
    assert [set(rows([next(loader) for loader in resumed])) for _ in range(2)] == [set(epoch1[6:8]), set(epoch1[8:10])]


def test_a_position_in_the_tail_other_ranks_drop_goes_on_at_the_next_epoch(tiny_dataset):
    # One rank read all but the last sample of epoch 0; for W ranks the epoch ends earlier (its last
    # n % W samples are dropped): they start epoch 1 at its first sample, skipping none of it.
    one = TokenLoader(tiny_dataset, "train", 0, 1, batch_size=1, seed=0)
    n = one.dataset.per_rank
    world = next(w for w in range(3, n) if n % w >= 2)
    epoch1 = rows(take(one, 2 * n))[n:]
    resumed = [TokenLoader(tiny_dataset, "train", r, world, batch_size=1, seed=0) for r in range(world)]
    skipped = [loader.load_state_dict({"epoch": 0, "position": n - 1, "world_size": 1}) for loader in resumed]
    assert skipped == [0] * world
    assert set(rows([next(loader) for loader in resumed])) == set(epoch1[:world])
    assert all(loader.state_dict()["epoch"] == 1 for loader in resumed)


def test_missing_shard_is_named(tiny_dataset, tmp_path):
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(tiny_dataset, copy)
    (copy / "train/shard-000001.tar").unlink()
    loader = TokenLoader(copy, "train", 0, 1, batch_size=64, seed=0, shuffle=False)
    with pytest.raises(FileNotFoundError, match="shard-000001.tar"):
        take(loader, 3)


def test_unshuffled_loader_reads_in_shard_order(tiny_dataset):
    import webdataset as wds

    m = read_manifest(tiny_dataset)
    expected = [s["tokens.npy"] for s in wds.WebDataset(str(tiny_dataset / m.shards("train")[0].name), shardshuffle=False).decode()]
    got = next(TokenLoader(tiny_dataset, "train", 0, 1, batch_size=len(expected), seed=0, shuffle=False))
    assert np.array_equal(got.numpy(), np.stack(expected).astype(np.int64))


def _copy(tiny_dataset, tmp_path):
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(tiny_dataset, copy)
    return copy


def _first_batch(root):
    return next(TokenLoader(root, "train", 0, 1, batch_size=1, seed=0, shuffle=False))


def test_truncated_shard_is_named(tiny_dataset, tmp_path):
    copy = _copy(tiny_dataset, tmp_path)
    shard = copy / "train/shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(ValueError, match=r"shard-000000.tar is truncated or altered: 3000 bytes"):
        _first_batch(copy)


def _first_sample_at(shard) -> int:
    import tarfile

    with tarfile.open(shard) as tar:
        return tar.next().offset_data


def _damage(copy, shard_name, offset, byte=None, xor=0):
    """Changes one byte at `offset` from the first sample's data (its .npy preamble first)."""
    shard = copy / shard_name
    offset += _first_sample_at(shard)
    data = bytearray(shard.read_bytes())
    data[offset] = byte if byte is not None else data[offset] ^ xor
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("workers", [0, 1])
def test_a_damaged_sample_is_named_with_its_shard(tiny_dataset, tmp_path, workers):
    import multiprocessing

    copy = _copy(tiny_dataset, tmp_path)
    _damage(copy, "train/shard-000000.tar", 1, xor=0x20)  # the .npy magic: same size, other bytes
    loader = TokenLoader(copy, "train", 0, 1, batch_size=1, seed=0, shuffle=False, num_workers=workers)
    # Found in a worker process, the error reads as it does in this one: torch's wrapping left out.
    with pytest.raises(ValueError, match=r"^shard /.*shard-000000.tar: sample 0 is not a token array \(.*\): the shard "
                                         r"is damaged \(`elmforge prepare prepare.verify=true` checks every shard\): "
                                         r"rebuild the dataset with the same data settings and prepare.force=true$"):
        next(loader)
    loader.close()
    assert multiprocessing.active_children() == []


def test_a_token_id_beyond_the_vocabulary_is_named(tiny_dataset, tmp_path):
    copy = _copy(tiny_dataset, tmp_path)
    preamble, vocab = 128, read_manifest(copy).vocab_size  # then the tokens, uint16, little-endian
    assert read_manifest(copy).dtype == "uint16" and vocab <= 0xFF00
    _damage(copy, "train/shard-000000.tar", preamble + 2 * 3 + 1, byte=0xFF)  # token 3's high byte
    with pytest.raises(ValueError, match=rf"shard-000000.tar: sample 0 holds token id 65[0-9]{{3}}, beyond the "
                                         rf"tokenizer's {vocab}: the shard is damaged"):
        _first_batch(copy)


def test_a_shard_with_more_or_fewer_members_than_counted_is_named(tiny_dataset, tmp_path):
    import json

    for delta in (-1, 1):
        copy = _copy(tiny_dataset, tmp_path / str(delta))
        manifest = json.loads((copy / "manifest.json").read_text())
        entry = manifest["splits"]["train"]["shards"][0]
        entry["samples"] += delta  # the file as written, the count not: the last header or the end is elsewhere
        (copy / "manifest.json").write_text(json.dumps(manifest))
        actual = entry["samples"] - delta
        with pytest.raises(ValueError, match=rf"shard-000000.tar holds {actual} samples, the manifest says "
                                             rf"{actual + delta}: rebuild"):
            _first_batch(copy)


def test_a_shard_is_opened_by_reading_a_few_headers_not_the_whole_file(tiny_dataset, monkeypatch):
    # A rank touches every shard of the mix (4,400 x 1 GB) in its first steps: no full read or header scan.
    import tarfile

    from data_pipelines import shard_index

    def refused(*args, **kwargs):
        raise AssertionError("the shard was read whole")

    monkeypatch.setattr(tarfile.TarFile, "getmembers", refused)
    monkeypatch.setattr(shard_index, "_scanned_spans", refused)
    n = read_manifest(tiny_dataset).num_samples("train")
    everything = rows(take(TokenLoader(tiny_dataset, "train", 0, 1, batch_size=n, seed=0, shuffle=False), 1))
    monkeypatch.undo()
    from data_pipelines.shard_index import SampleIndex

    index = SampleIndex(read_manifest(tiny_dataset), "train")
    assert everything == [tuple(index[i].astype(np.int64).tolist()) for i in range(n)]
    assert [len(shard_index._scanned_spans(tiny_dataset / s.name)) for s in index.shards] == \
        [s.samples for s in index.shards]


def test_a_shard_first_opened_after_a_rebuild_in_place_is_refused(tiny_dataset, tmp_path):
    # A rebuild with other settings can write shards of the same sizes and layout; the manifest is a new file.
    import os
    import shutil

    copy = _copy(tiny_dataset, tmp_path)
    loader = TokenLoader(copy, "train", 0, 1, batch_size=1, seed=0, shuffle=False)
    next(loader)  # the first shard is open
    rebuilt = tmp_path / "rebuilt"
    shutil.copytree(copy, rebuilt)
    os.replace(copy, tmp_path / "old")  # as prepare swaps a rebuilt dataset in
    os.replace(rebuilt, copy)
    per_shard = read_manifest(copy).shards("train")[0].samples
    for _ in range(per_shard - 1):
        next(loader)  # the rest of the open shard
    with pytest.raises(ValueError, match=r"dataset .*ds was rebuilt while a run reads it \(its manifest.json was "
                                         r"replaced\): its train split is other data now"):
        next(loader)


def test_a_shard_evicted_from_the_open_ones_is_not_reopened_from_a_rebuild(tiny_dataset, tmp_path):
    import os
    import shutil

    from data_pipelines.shard_index import SampleIndex

    copy = _copy(tiny_dataset, tmp_path)
    index = SampleIndex(read_manifest(copy), "train")
    index._max_open = 1
    for i in range(index.num_samples):  # every shard indexed; only the last one stays open
        index[i]
    shutil.copytree(copy, tmp_path / "rebuilt")
    os.replace(copy, tmp_path / "old")
    os.replace(tmp_path / "rebuilt", copy)
    with pytest.raises(ValueError, match=r"was rebuilt while a run reads it \(its manifest.json was replaced\)"):
        index[0]


def test_shards_of_one_sample_and_of_uint32_tokens_take_the_few_headers_path(tmp_path, monkeypatch):
    # A split's last shard holds one sample whenever its count is one past a multiple of samples_per_shard.
    import io

    from data_pipelines import shard_index
    from data_pipelines.shard_writer import ShardWriter

    def refused(*args, **kwargs):
        raise AssertionError("every header was read")

    monkeypatch.setattr(shard_index, "_scanned_spans", refused)
    for dtype in (np.uint16, np.uint32):
        root = tmp_path / np.dtype(dtype).name
        writer = ShardWriter(root, "train", samples_per_shard=2)
        samples = [np.arange(9, dtype=dtype) + 100_000 * (dtype == np.uint32) + i for i in range(3)]
        for sample in samples:
            writer.write(sample)
        shards = writer.finish()
        assert [shard.samples for shard in shards] == [2, 1]
        read = []
        for shard in shards:
            spans, data = shard_index.check_shard(root, shard), (root / shard.name).read_bytes()
            read += [np.load(io.BytesIO(data[offset : offset + size])) for offset, size in map(spans.__getitem__,
                                                                                             range(len(spans)))]
        assert [r.tolist() for r in read] == [s.tolist() for s in samples] and read[0].dtype == dtype


def test_a_sample_of_another_dtype_or_length_than_the_manifest_says_is_named(tiny_dataset, tmp_path):
    import json

    copy = _copy(tiny_dataset, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["seq_len"] += 1  # the shards as written, the manifest not
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"sample 0 is not a token array \({manifest['seq_len']} uint16 tokens, the "
                                         rf"manifest says {manifest['seq_len'] + 1} uint16\): the shard is damaged"):
        _first_batch(copy)


def test_a_process_keeps_a_bounded_number_of_shards_open(tiny_dataset, monkeypatch):
    from data_pipelines.shard_index import SampleIndex

    index = SampleIndex(read_manifest(tiny_dataset), "train")
    assert len(index.shards) > 2
    index._max_open = 2
    for i in range(index.num_samples):
        index[i]
    assert len(index._files) == 2 and all(not f.closed for f in index._files.values())
    assert list(index._files) == [len(index.shards) - 2, len(index.shards) - 1]  # the most recently read


def test_an_open_loader_with_workers_lets_the_process_exit(tiny_dataset):
    # Its workers ignore SIGTERM (a process group's, from `timeout` or Slurm, is the trainer's to handle), so
    # multiprocessing's SIGTERM-and-wait at exit would wait forever: a loader left open (say, held by the
    # traceback of an error on its way out) stops its workers first.
    import subprocess
    import sys

    script = ("from data_pipelines.loader import TokenLoader\n"
              f"loader = TokenLoader({str(tiny_dataset)!r}, 'train', 0, 1, batch_size=2, seed=0, num_workers=1)\n"
              "next(loader)\nprint('read', flush=True)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0 and done.stdout == "read\n", done.stderr


def test_tokenizer_mismatch_is_named(tiny_dataset, tmp_path):
    copy = _copy(tiny_dataset, tmp_path)
    (copy / "tokenizer.json").write_text((copy / "tokenizer.json").read_text().replace('"<s>"', '"<S>"'))
    with pytest.raises(ValueError, match=r"tokenizer.json does not match the fingerprint"):
        _first_batch(copy)
    with pytest.raises(ValueError, match="was tokenized with tokenizer"):
        TokenLoader(tiny_dataset, "train", 0, 1, batch_size=1, seed=0, tokenizer_fingerprint="0" * 64)


def test_member_path_leaving_the_archive_is_refused(tiny_dataset, tmp_path):
    import hashlib
    import io
    import json
    import tarfile

    copy = _copy(tiny_dataset, tmp_path)
    shard = copy / "train/shard-000000.tar"
    buf = io.BytesIO()
    with tarfile.open(shard) as src, tarfile.open(fileobj=buf, mode="w") as dst:
        for i, m in enumerate(src.getmembers()):
            data = src.extractfile(m).read()
            if i == 0:
                m.name = "../../escape.tokens.npy"
            dst.addfile(m, io.BytesIO(data))
    shard.write_bytes(buf.getvalue())
    manifest = json.loads((copy / "manifest.json").read_text())  # a consistent manifest: only the path is wrong
    entry = manifest["splits"]["train"]["shards"][0]
    entry["bytes"], entry["sha256"] = len(buf.getvalue()), hashlib.sha256(buf.getvalue()).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"shard-000000.tar: member '../../escape.tokens.npy' is not a plain file"):
        _first_batch(copy)


def test_the_shuffled_order_is_numpys_seeded_permutation_dealt_among_ranks(tiny_dataset):
    # The order runs have trained with (and resume into): rank r of W reads permuted positions r, r+W, ...
    n = read_manifest(tiny_dataset).num_samples("train")
    in_order = rows(take(TokenLoader(tiny_dataset, "train", 0, 1, batch_size=n, seed=0, shuffle=False), 1))
    world, seed = 3, 7
    for epoch in (0, 1):
        permutation = np.random.default_rng([seed, epoch]).permutation(n)
        for rank in range(world):
            loader = TokenLoader(tiny_dataset, "train", rank, world, batch_size=1, seed=seed)
            got = rows(take(loader, (epoch + 1) * (n // world)))[epoch * (n // world) :]
            assert got == [in_order[i] for i in permutation[rank::world][: n // world]]


def test_the_index_of_a_shard_we_wrote_is_a_few_numbers_whatever_its_size(tiny_dataset):
    from data_pipelines.shard_index import MemberSpans, SampleIndex, check_shard

    index = SampleIndex(read_manifest(tiny_dataset), "train")
    for shard in range(len(index.shards)):
        assert check_shard(tiny_dataset, index.shards[shard]).regular, index.shards[shard].name  # no per-sample arrays kept
    # Members of other sizes or spacing (a shard from elsewhere) are kept one by one, and read alike.
    spans = [(512, 100), (1536, 100), (3072, 60), (4096, 60)]
    assert [MemberSpans(spans)[i] for i in range(4)] == spans and not MemberSpans(spans).regular
    assert [MemberSpans(spans[:2])[i] for i in range(2)] == spans[:2] and MemberSpans(spans[:2]).regular
    with pytest.raises(IndexError):
        MemberSpans(spans[:2])[2]

import gzip
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from tokenizers import Tokenizer

from corpus import TOKENIZER_CFG, data_cfg, make_documents, write_jsonl
from data_pipelines.manifest import read_manifest
from data_pipelines.packing import Packer, token_dtype
from data_pipelines.prepare import describe_plan, prepare


def test_manifest_describes_every_shard(tiny_dataset):
    m = read_manifest(tiny_dataset)
    assert m.seq_len == 32 and m.dtype == "uint16" and m.vocab_size == 300
    stats = m.data["stats"]
    assert stats["documents_read"] == stats["documents_kept"] == 300
    for split in ("train", "val"):
        shards = m.shards(split)
        assert shards, split
        assert sum(s.samples for s in shards) == m.data["splits"][split]["samples"]
        for s in shards:
            with tarfile.open(tiny_dataset / s.name) as tar:
                names = tar.getnames()
            assert len(names) == s.samples
            assert all(n.endswith(".tokens.npy") for n in names)
            assert s.tokens == s.samples * 33
    assert all(s.samples == 64 for s in m.shards("train")[:-1])
    # Packing loses only the tail of each split.
    packed = sum(m.data["splits"][s]["tokens"] for s in ("train", "val"))
    assert packed + sum(stats["dropped_tail_tokens"].values()) == stats["tokens"]


def test_webdataset_reads_our_shards(tiny_dataset):
    m = read_manifest(tiny_dataset)
    shard = m.shards("train")[0]
    samples = list(wds.WebDataset(str(tiny_dataset / shard.name), shardshuffle=False).decode())
    assert len(samples) == shard.samples
    arr = samples[0]["tokens.npy"]
    assert arr.dtype == np.uint16 and arr.shape == (33,)


def test_samples_hold_documents_framed_by_bos_and_eos(tmp_path):
    docs = make_documents(40, seed=1)
    out = prepare(data_cfg(write_jsonl(tmp_path / "c.jsonl", docs), tmp_path / "ds", val_fraction=0.0), TOKENIZER_CFG)
    m = read_manifest(out)
    tok = Tokenizer.from_file(str(m.tokenizer_path))
    stream = np.concatenate(
        [s["tokens.npy"] for s in wds.WebDataset(str(out / m.shards("train")[0].name), shardshuffle=False).decode()]
    )
    bos, eos = m.data["tokenizer"]["bos_id"], m.data["tokenizer"]["eos_id"]
    assert stream[0] == bos
    first_doc = stream[1 : int(np.argmax(stream == eos))]
    assert tok.decode(first_doc.tolist()) == docs[0]
    assert stream[len(first_doc) + 2] == bos  # the next document starts right after EOS


def test_rebuild_is_byte_identical_and_reuse_does_no_work(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(120))
    a = prepare(data_cfg(corpus, tmp_path / "a"), TOKENIZER_CFG)
    b = prepare(data_cfg(corpus, tmp_path / "b"), TOKENIZER_CFG)
    ma, mb = read_manifest(a), read_manifest(b)
    assert [s.sha256 for s in ma.shards("train")] == [s.sha256 for s in mb.shards("train")]
    assert (a / "train/shard-000000.tar").read_bytes() == (b / "train/shard-000000.tar").read_bytes()
    before = (a / "manifest.json").stat().st_mtime_ns
    capsys.readouterr()
    prepare(data_cfg(corpus, tmp_path / "a"), TOKENIZER_CFG)
    assert "up to date" in capsys.readouterr().out
    assert (a / "manifest.json").stat().st_mtime_ns == before
    # The dry run says the same, and that prepare.force would rebuild it anyway.
    assert describe_plan(data_cfg(corpus, tmp_path / "a"), TOKENIZER_CFG).endswith("existing dataset: up to date")
    assert describe_plan(data_cfg(corpus, tmp_path / "a"), TOKENIZER_CFG, force=True).endswith(
        "existing dataset: up to date, but prepare.force: would rebuild")


def test_changed_input_or_setting_rebuilds(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(120))
    out = prepare(data_cfg(corpus, tmp_path / "ds"), TOKENIZER_CFG)
    fp = read_manifest(out).data["source"]["fingerprint"]
    prepare(data_cfg(corpus, tmp_path / "ds", seq_len=16), TOKENIZER_CFG)
    assert read_manifest(out).seq_len == 16
    write_jsonl(corpus, make_documents(120, seed=9))
    prepare(data_cfg(corpus, tmp_path / "ds", seq_len=16), TOKENIZER_CFG)
    assert read_manifest(out).data["source"]["fingerprint"] != fp
    assert not list(tmp_path.glob(".ds.*")), "temporary directories left behind"


def test_a_killed_rebuild_is_named_by_a_prepare_that_finds_the_dataset_up_to_date(tmp_path, capsys):
    import socket
    import subprocess
    import sys

    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(40))
    prepare(data_cfg(corpus, tmp_path / "ds"), TOKENIZER_CFG)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    killed = tmp_path / f".ds.tmp-{socket.gethostname()}-{dead}"  # a prepare.force=true rebuild, killed
    (killed / "train").mkdir(parents=True)
    prepare(data_cfg(corpus, tmp_path / "ds"), TOKENIZER_CFG)
    # Named, not deleted: a live build in another container (its own pids) would look the same from here.
    out = capsys.readouterr().out
    assert "up to date" in out and f"[prepare] {killed} is left from a build that was killed" in out
    assert killed.exists()


@pytest.mark.parametrize("manifest", ['{"format_version": 0}', "{truncated"])
def test_a_manifest_prepare_cannot_read_is_rebuilt(tmp_path, capsys, manifest):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(40))
    out = prepare(data_cfg(corpus, tmp_path / "ds"), TOKENIZER_CFG)
    (out / "manifest.json").write_text(manifest)  # an older elmforge's, or cut short
    prepare(data_cfg(corpus, tmp_path / "ds"), TOKENIZER_CFG)
    assert "ds cannot be reused" in capsys.readouterr().out and read_manifest(out).data["format_version"] == 1


def test_gzip_and_txt_sources_and_empty_documents_are_counted(tmp_path):
    docs = make_documents(30)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        for d in docs + [""]:
            f.write(json.dumps({"body": d}) + "\n")
    (tmp_path / "b.txt").write_text("A plain text file is one whole document.")
    cfg = data_cfg(tmp_path / "unused", tmp_path / "ds")
    cfg["sources"] = [{"path": str(tmp_path / "*.jsonl.gz"), "text_field": "body"}, {"path": str(tmp_path / "b.txt")}]
    stats = read_manifest(prepare(cfg, TOKENIZER_CFG)).data["stats"]
    assert stats["documents_read"] == 32
    assert stats["dropped"]["empty"] == 1
    assert stats["documents_kept"] == 31


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "fine"}\n{not json\n',
         r"c\.jsonl:2: bad record \(invalid_json: Expecting property name enclosed in double quotes at column 2\)"),
        ('{"text": "fine"}\n{"body": "x"}\n', r"c\.jsonl:2: bad record \(missing_text_field: no field 'text'"),
        ('{"text": "fine"}\n{"text": "a\tb"}\n', r"c\.jsonl:2: bad record \(invalid_json: Invalid control character at column 12\)"),
        ('{"text": "   "}\n', r"kept none of its 1 documents \(dropped: {'empty': 1}\): its documents are empty"),
        ("not json at all\n", r"c\.jsonl:1: not JSON lines"),
    ],
)
def test_bad_input_is_a_clear_error_and_keeps_the_old_dataset(tmp_path, content, message):
    good = write_jsonl(tmp_path / "good.jsonl", make_documents(60))
    out = prepare(data_cfg(good, tmp_path / "ds"), TOKENIZER_CFG)
    before = (out / "manifest.json").read_text()
    bad = tmp_path / "c.jsonl"
    bad.write_text(content)
    with pytest.raises(ValueError, match=message):
        prepare(data_cfg(bad, tmp_path / "ds", on_bad_record="error"), TOKENIZER_CFG)
    assert (out / "manifest.json").read_text() == before
    assert not list(tmp_path.glob(".ds.*"))


def test_bad_records_are_skipped_counted_and_named(tmp_path):
    docs = make_documents(40)
    lines = [json.dumps({"text": d}) for d in docs]
    lines[3] = "{broken"
    lines[7] = json.dumps({"body": "no text field"})
    lines[9] = json.dumps({"text": 42})
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    stats = read_manifest(prepare(data_cfg(tmp_path / "c.jsonl", tmp_path / "ds"), TOKENIZER_CFG)).data["stats"]
    assert stats["dropped"] == {"invalid_json": 1, "missing_text_field": 2}
    assert stats["documents_read"] == 40 and stats["documents_kept"] == 37
    examples = stats["sources"][0]["skipped_examples"]
    assert f"{tmp_path / 'c.jsonl'}:4: invalid_json" in examples
    assert f"{tmp_path / 'c.jsonl'}:8: missing_text_field" in examples


def test_a_directory_that_is_not_a_dataset_is_never_replaced(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(20))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"mine exists and is not a prepared dataset"):
        prepare(data_cfg(corpus, tmp_path / "mine"), TOKENIZER_CFG)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()  # an empty directory holds nothing to lose
    assert (prepare(data_cfg(corpus, tmp_path / "empty"), TOKENIZER_CFG) / "manifest.json").is_file()
    # Another tool's manifest.json is no dataset of ours.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text('{"name": "some other tool"}')
    (tmp_path / "other" / "important.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"other exists and is not a prepared dataset \(its manifest.json is not"):
        prepare(data_cfg(corpus, tmp_path / "other"), TOKENIZER_CFG)
    assert (tmp_path / "other" / "important.txt").read_text() == "keep me"
    # Ours with its manifest cut short (a full disk) is rebuilt: prepare is how it is mended.
    (tmp_path / "empty" / "manifest.json").write_text('{"format_version": 1, "spl')
    assert read_manifest(prepare(data_cfg(corpus, tmp_path / "empty"), TOKENIZER_CFG)).num_samples("train") > 0


def test_a_data_dir_that_links_elsewhere_is_rebuilt_where_it_points_and_stays_a_link(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(20))
    (tmp_path / "big_disk").mkdir()
    link = tmp_path / "data" / "ds"
    link.parent.mkdir()
    link.symlink_to(tmp_path / "big_disk" / "ds", target_is_directory=True)
    # What a swap killed while deleting the directory it replaced leaves: no obstacle, and removed.
    (tmp_path / "big_disk" / ".ds.old-1").mkdir()
    (tmp_path / "big_disk" / ".ds.old-1" / "shard.tar").write_bytes(b"old")
    for force in (False, True):
        assert prepare(data_cfg(corpus, link), TOKENIZER_CFG, force=force) == link
        assert link.is_symlink() and (tmp_path / "big_disk" / "ds" / "manifest.json").is_file()
        assert sorted(p.name for p in (tmp_path / "big_disk").iterdir()) == ["ds"]
        assert sorted(p.name for p in link.parent.iterdir()) == ["ds"]
    assert read_manifest(link).num_samples("train") > 0


@pytest.mark.parametrize(
    "second, filters, message",
    [
        ("", {}, r"data source 'quiet' holds no document \(its file is empty\); give it data, or remove it or "
         r"give it weight 0 \(data.sources.1.weight=0\)"),
        ("\n\n", {}, r"data source 'quiet' holds no document \(its file is empty\)"),
        ('{"text": "short"}\n{"text": "tiny"}\n', {"min_chars": 10},
         r"data source 'quiet' kept none of its 2 documents \(dropped: {'too_few_characters': 2}\): "
         r"lower data.filters.min_chars"),
    ],
)
def test_a_source_that_keeps_no_document_is_an_error(tmp_path, second, filters, message):
    good = write_jsonl(tmp_path / "good.jsonl", make_documents(30, min_words=20))
    (tmp_path / "quiet.jsonl").write_text(second)
    cfg = data_cfg(good, tmp_path / "ds", filters={"min_chars": 0, "min_tokens": 0, "dedup": True, **filters})
    cfg["sources"].append({"name": "quiet", "path": str(tmp_path / "quiet.jsonl")})
    if not filters:  # found by the checks before any work, the dry run's too
        with pytest.raises(ValueError, match=message):
            describe_plan(cfg, TOKENIZER_CFG)
    with pytest.raises(ValueError, match=message):
        prepare(cfg, TOKENIZER_CFG)
    assert not (tmp_path / "ds").exists()
    cfg["sources"][1]["weight"] = 0  # as the message says: a source given weight 0 is not read
    assert (prepare(cfg, TOKENIZER_CFG) / "manifest.json").is_file()


def test_training_the_tokenizer_shows_progress(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(30))
    prepare(data_cfg(corpus, tmp_path / "ds"), {**TOKENIZER_CFG, "max_train_documents": 20})
    assert "[prepare tokenizer] 20 docs (" in capsys.readouterr().out


def test_a_corpus_smaller_than_one_sample_says_what_to_change(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(3, max_words=30))
    with pytest.raises(ValueError, match=r"fewer than one sample of data.seq_len\+1 = 513: lower data.seq_len"):
        prepare(data_cfg(corpus, tmp_path / "ds", seq_len=512, val_fraction=0.0), TOKENIZER_CFG)
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(100, max_words=30))  # enough, but not to the target
    with pytest.raises(ValueError, match=r"lower data.seq_len or raise data.target_tokens=300$"):
        prepare(data_cfg(corpus, tmp_path / "ds", seq_len=512, val_fraction=0.0, target_tokens=300), TOKENIZER_CFG)
    with pytest.raises(ValueError, match=r"0 training tokens and [\d,]+ val tokens.*lower data.val_fraction=0.999"):
        prepare(data_cfg(corpus, tmp_path / "ds", seq_len=16, val_fraction=0.999999), TOKENIZER_CFG)  # all to val


def test_missing_source_names_the_pattern(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        prepare(data_cfg(tmp_path / "nothing-here*.jsonl", tmp_path / "ds"), TOKENIZER_CFG)


def test_given_tokenizer_file_is_used_as_is(tmp_path, tiny_dataset):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(50, seed=4))
    given = str(read_manifest(tiny_dataset).tokenizer_path)
    out = prepare(data_cfg(corpus, tmp_path / "ds"), {"kind": "file", "vocab_size": 300, "path": given})
    assert read_manifest(out).data["tokenizer"]["fingerprint"] == read_manifest(tiny_dataset).data["tokenizer"]["fingerprint"]


def test_packer_emits_full_samples_and_counts_the_tail():
    packer = Packer(seq_len=4, bos=1, eos=2, dtype=token_dtype(100))
    samples = list(packer.add([10, 11, 12])) + list(packer.add([20, 21, 22, 23, 24]))
    assert [s.tolist() for s in samples] == [[1, 10, 11, 12, 2], [1, 20, 21, 22, 23]]
    packer.finish()
    assert packer.dropped_tail_tokens == 2


def test_shard_bytes_bounds_the_size_of_each_shard(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(120))
    m = read_manifest(prepare(data_cfg(corpus, tmp_path / "ds", shard_bytes=20_000), TOKENIZER_CFG))
    shards = m.shards("train")
    assert len(shards) > 2
    # The tar's end (two zero blocks, padding to a 10 KiB record) comes on top of the samples.
    assert all(s.bytes <= 20_000 + tarfile.RECORDSIZE for s in shards)
    assert shards[0].bytes > 20_000 // 2


def test_token_dtype_widens_only_when_needed():
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_verify_accepts_a_good_dataset_and_names_a_corrupt_shard(tmp_path, tiny_dataset):
    import shutil

    from data_pipelines.integrity import verify_dataset

    copy = tmp_path / "ds"
    shutil.copytree(tiny_dataset, copy)
    assert verify_dataset(copy) == len(read_manifest(copy).shards("train")) + len(read_manifest(copy).shards("val"))
    shard = copy / "train/shard-000002.tar"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shard-000002.tar is corrupt: .*: rebuild the dataset with the same data settings and prepare.force=true"):
        verify_dataset(copy)
    (copy / "train/shard-000004.tar").unlink()  # every bad shard is named, not only the first
    total = len(read_manifest(copy).shards("train")) + len(read_manifest(copy).shards("val"))
    with pytest.raises(ValueError, match=r"shard-000002.tar is corrupt: .*; shard .*shard-000004.tar listed in the "
                                         rf"manifest is missing \(2 of {total} shards\): rebuild the dataset"):
        verify_dataset(copy)
    shutil.copy(tiny_dataset / "train/shard-000002.tar", shard)
    shutil.copy(tiny_dataset / "train/shard-000004.tar", copy / "train/shard-000004.tar")
    with open(copy / "tokenizer.json", "a") as f:  # a tokenizer the shards were not made with, refused at train
        f.write(" ")
    with pytest.raises(ValueError, match=r"tokenizer .*tokenizer.json does not match the fingerprint"):
        verify_dataset(copy)


def test_cli_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    from cluster.cli import main

    assert main(["prepare", f"storage_path={tmp_path}", "prepare.dry_run=true"]) == 0
    out = capsys.readouterr().out
    assert "sqlite_docs: weight 100.00%: 1 file(s)" in out and "vocab 4096" in out and "129 tokens" in out
    assert not list(tmp_path.iterdir())


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    from cluster.cli import main

    assert main(["prepare", f"storage_path={tmp_path}", "prepare.verify=true"]) == 1
    err = capsys.readouterr().err
    assert "manifest.json not found" in err and "Traceback" not in err
    for other in ("prepare.dry_run=true", "prepare.force=true"):  # verify writes nothing: it would ignore them
        assert main(["prepare", f"storage_path={tmp_path}", "prepare.verify=true", other]) == 2
        assert "prepare.verify=true: checks a built dataset and writes nothing: give it alone" in capsys.readouterr().err


def test_a_corpus_too_small_for_a_val_sample_is_told_and_the_loader_names_the_fix(tmp_path, capsys):
    from data_pipelines.loader import RankBatches

    corpus = write_jsonl(tmp_path / "small.jsonl", make_documents(12, seed=4))
    out = prepare(data_cfg(corpus, tmp_path / "ds", val_fraction=0.02), TOKENIZER_CFG)
    assert "[prepare] warning: no val sample (data.val_fraction=0.02 of 12 documents)" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"split 'val' of .* has no sample \(raise data.val_fraction and prepare"):
        RankBatches(read_manifest(out), "val", 0, 1, 4, seed=0, shuffle=False)


def test_a_wrong_input_file_is_named_before_ray_would_start(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(20), field="body")
    started = []
    with pytest.raises(ValueError, match=r"has a string 'text' .*set data.sources.0.text_field"):
        prepare(data_cfg(corpus, tmp_path / "ds"), TOKENIZER_CFG, before_build=lambda: started.append("ray"))
    assert not started


def test_a_tokenizer_actors_error_reaches_the_user_as_its_kind_or_as_a_value_error():
    from data_pipelines.tokenize_stage import _without_ray

    missing = _without_ray(FileNotFoundError("shard x is missing"))
    assert type(missing) is FileNotFoundError and str(missing) == "shard x is missing"
    unencodable = UnicodeEncodeError("utf-8", "\ud83d", 0, 1, "surrogates not allowed")  # takes five arguments
    plain = _without_ray(unencodable)
    assert type(plain) is ValueError and str(plain) == str(unencodable)


def test_a_killed_build_of_this_machine_is_cleaned_up_and_another_machines_is_left(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from data_pipelines.prepare import _remove_stale_builds

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    names = {"mine": f".ds.tmp-{socket.gethostname()}-{dead}", "older": f".ds.tmp-{dead}",
             "other": f".ds.tmp-node-7.cluster-{dead}", "alive": f".ds.tmp-{socket.gethostname()}-{os.getpid()}"}
    for name in names.values():
        (tmp_path / name).mkdir()
    _remove_stale_builds(tmp_path / "ds")
    # On storage shared between nodes, another machine's build may still be written: its process is not ours to see.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names["other"], names["alive"]])
    # A name with glob characters is matched as written, and matches no other dataset's leftovers.
    for name in (f".corpus[v2].tmp-{socket.gethostname()}-{dead}", ".corpus[v2].old-1", ".corpusv.old-1"):
        (tmp_path / name).mkdir()
    _remove_stale_builds(tmp_path / "corpus[v2]")
    assert ".corpusv.old-1" in {p.name for p in tmp_path.iterdir()} and not list(tmp_path.glob(".corpus[[]v2]*"))

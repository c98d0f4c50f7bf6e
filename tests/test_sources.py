"""Every supported source format reads the same documents; bad files are named."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from corpus import TOKENIZER_CFG, data_cfg, make_documents
from data_pipelines.manifest import read_manifest
from data_pipelines.prepare import describe_plan, prepare
from data_pipelines.sources import check_files, read_unit, read_units

DOCS = make_documents(12, seed=3)


def jsonl_bytes(docs, field="text"):
    return "".join(json.dumps({field: d, "meta": i}) + "\n" for i, d in enumerate(docs)).encode()


WRITERS = {
    "a.jsonl": lambda p: p.write_bytes(jsonl_bytes(DOCS)),
    "a.jsonl.gz": lambda p: p.write_bytes(gzip.compress(jsonl_bytes(DOCS))),
    "a.jsonl.zst": lambda p: p.write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(DOCS))),
    "a.json.gz": lambda p: p.write_bytes(gzip.compress(jsonl_bytes(DOCS))),
    "a.parquet": lambda p: pq.write_table(pa.table({"text": DOCS, "meta": list(range(len(DOCS)))}), p, row_group_size=5),
}


def texts(spec):
    return [r.text for unit in read_units(spec, 0) for r in read_unit(unit, spec.get("text_field", "text"))]


@pytest.mark.parametrize("name", list(WRITERS))
def test_every_format_reads_the_same_documents(tmp_path, name):
    WRITERS[name](tmp_path / name)
    assert texts({"path": str(tmp_path / name)}) == DOCS


def test_txt_files_are_one_document_each_and_globs_are_sorted(tmp_path):
    for i, d in enumerate(DOCS[:3]):
        (tmp_path / f"doc{i}.txt").write_text(d)
    (tmp_path / "doc3.txt.gz").write_bytes(gzip.compress(DOCS[3].encode()))
    assert texts({"path": str(tmp_path / "doc*")}) == DOCS[:4]


def test_a_directory_is_refused_with_a_glob_for_the_files_it_holds(tmp_path):
    def hint(directory) -> str:
        with pytest.raises(IsADirectoryError) as e:
            read_units({"path": str(directory)}, 0)
        return str(e.value).rsplit("e.g. ", 1)[1]

    (tmp_path / "books").mkdir()
    for i in range(2):
        (tmp_path / f"books/b{i}.txt.zst").write_bytes(zstandard.compress(DOCS[i].encode()))
    (tmp_path / "books/README.md").write_text("not data")
    (tmp_path / "books/index.jsonl").write_bytes(jsonl_bytes(DOCS[:1]))
    assert hint(tmp_path / "books") == f"{tmp_path}/books/*.txt.zst"
    (tmp_path / "crawl/2024").mkdir(parents=True)
    (tmp_path / "crawl/2024/part.parquet").write_bytes(b"")
    assert hint(tmp_path / "crawl") == f"{tmp_path}/crawl/**/*.parquet"
    (tmp_path / "empty").mkdir()
    assert hint(tmp_path / "empty") == f"{tmp_path}/empty/*.jsonl"


def test_text_field_is_configurable(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes(DOCS, field="content"))
    assert texts({"path": str(tmp_path / "a.jsonl"), "text_field": "content"}) == DOCS


def test_a_half_emoji_escape_a_byte_order_mark_and_glob_characters_in_a_file_name_are_read(tmp_path):
    import codecs

    folder = tmp_path / "corpus[v2]"  # a literal name, not a glob's character class
    folder.mkdir()
    path = folder / "a.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + b'{"text": "cut \\ud83d emoji"}\n{"text": "whole \\ud83d\\ude00 one"}\n')
    assert check_files({"path": str(path)}, 0) == [str(path)]
    records = [r for u in read_units({"path": str(path)}, 0) for r in read_unit(u)]
    assert [r.text for r in records] == ["cut \ufffd emoji", "whole \U0001F600 one"]
    assert [r.replaced for r in records] == [1, 0]
    (tmp_path / "b.txt").write_bytes(codecs.BOM_UTF8 + b"plain text")
    assert [r.text for u in read_units({"path": str(tmp_path / "b.txt")}, 0) for r in read_unit(u)] == ["plain text"]
    # A text file saved as UTF-16 (Windows' "Unicode") or UTF-32 with its byte order mark: read as such.
    for bom, codec in ((codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"),
                       (codecs.BOM_UTF32_LE, "utf-32-le")):
        (tmp_path / "c.txt").write_bytes(bom + "café 東京 \U0001F600".encode(codec))
        records = [r for u in read_units({"path": str(tmp_path / "c.txt")}, 0) for r in read_unit(u)]
        assert [(r.text, r.replaced) for r in records] == [("café 東京 \U0001F600", 0)]


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path):
    raw = b'{"text": "caf\xe9 au lait"}\n{"text": "fine"}\n'
    (tmp_path / "a.jsonl").write_bytes(raw)
    records = [r for u in read_units({"path": str(tmp_path / "a.jsonl")}, 0) for r in read_unit(u)]
    assert records[0].text == "caf\ufffd au lait" and records[0].replaced == 1
    assert records[1].replaced == 0


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl.gz", b'{"text": "not compressed"}\n', r"bad\.jsonl\.gz: not a valid gz file"),
        ("bad.jsonl.zst", b'{"text": "not compressed"}\n', r"bad\.jsonl\.zst: not a valid zst file"),
        ("bad.parquet", b"PAR1 this is not parquet", r"bad\.parquet: not a valid parquet file"),
        ("bad.jsonl", b"\x89PNG\r\n\x1a\n binary", r"bad\.jsonl:1: not JSON lines"),
        ("bad.json", b'[\n  {"text": "a"}\n]\n', r"bad\.json:1: not JSON lines .*one JSON array: write one object"),
        ("bad.csv", b"a,b\n", r"bad\.csv: unsupported file type"),
    ],
)
def test_a_file_that_is_not_what_its_name_says_is_named(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        texts({"path": str(tmp_path / name)})


def test_parquet_without_the_text_column_is_named(tmp_path):
    pq.write_table(pa.table({"body": DOCS}), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match=r"a\.parquet: parquet file has no column 'text'"):
        texts({"path": str(tmp_path / "a.parquet")})
    pq.write_table(pa.table({"id": list(range(len(DOCS))), "body": DOCS}), tmp_path / "b.parquet")
    with pytest.raises(ValueError, match=r"b\.parquet: parquet column 'id' holds int64, not text \(text columns: "
                                         r"\['body'\]\); name the column that holds the text"):
        check_files({"path": str(tmp_path / "b.parquet"), "text_field": "id"}, 0)  # before any work


def test_the_checks_before_a_build_name_the_setting_and_a_one_line_json_array(tmp_path):
    from data_pipelines.sources import check_files

    (tmp_path / "arr.json").write_text('[{"text": "a"}, {"text": "b"}]')
    with pytest.raises(ValueError, match=r"arr\.json: not JSON lines \(line 1 is a JSON list\); it looks like one JSON"):
        check_files({"path": str(tmp_path / "arr.json")}, 0)
    pq.write_table(pa.table({"body": DOCS}), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match=r"name the column that holds the text \(data.sources.1.text_field\)"):
        check_files({"path": str(tmp_path / "a.parquet")}, 1)


def test_hugging_face_datasets_stream_local_files_by_shard(tmp_path, monkeypatch):
    """The real `datasets` streaming path, offline: a dataset directory with two data files."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "my_dataset" / "data"
    repo.mkdir(parents=True)
    (repo / "train-00000.jsonl").write_bytes(jsonl_bytes(DOCS[:7]))
    (repo / "train-00001.jsonl").write_bytes(jsonl_bytes(DOCS[7:]))
    spec = {"hf": str(tmp_path / "my_dataset"), "hf_split": "train"}
    units = read_units(spec, 0)
    assert len(units) == 2 and all(u.hf for u in units)
    records = [r for u in units for r in read_unit(u)]
    assert [r.text for r in records] == DOCS
    assert records[0].origin.endswith("[shard 0]#0")

    cfg = data_cfg(tmp_path / "unused", tmp_path / "ds")
    cfg["sources"] = [{**spec, "name": "hub"}]
    stats = read_manifest(prepare(cfg, TOKENIZER_CFG)).data["stats"]
    assert stats["documents_read"] == len(DOCS) and stats["sources"][0]["name"] == "hub"

    # A packaged builder over local files (hf: json): a changed file is a changed input, as for `path`.
    from data_pipelines.sources import fingerprint_sources

    builder = [{"hf": "json", "hf_data_files": str(repo / "*.jsonl")}]
    before = fingerprint_sources(builder)
    (repo / "train-00001.jsonl").write_bytes(jsonl_bytes(DOCS[8:]))
    assert fingerprint_sources(builder) != before


def test_a_wrong_text_field_is_found_before_any_work(tmp_path):
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(DOCS)))
    with pytest.raises(ValueError, match=(
        r"a\.jsonl\.gz: none of the first 12 records has a string 'body' \(line 1: no field 'body'; its fields: "
        r"meta, text\); set data.sources.1.text_field to the field"
    )):
        check_files({"path": str(tmp_path / "*.jsonl.gz"), "text_field": "body"}, 1)
    # A few bad records among good ones are left to on_bad_record.
    (tmp_path / "b.jsonl").write_bytes(jsonl_bytes(["x"], field="body") + jsonl_bytes(DOCS))
    assert check_files({"path": str(tmp_path / "b.jsonl")}, 0) == [str(tmp_path / "b.jsonl")]


def test_every_file_of_a_glob_is_checked_before_any_work(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes(DOCS))
    (tmp_path / "b.txt.gz").write_bytes(b"plain, not gzip")
    with pytest.raises(ValueError, match=r"b\.txt\.gz: not a valid gz file"):
        check_files({"path": str(tmp_path / "*")}, 0)
    (tmp_path / "b.txt.gz").unlink()
    (tmp_path / "c.csv").write_text("text\nhello\n")
    cfg = data_cfg(tmp_path / "*", tmp_path / "ds")
    with pytest.raises(ValueError, match=r"c\.csv: unsupported file type"):
        describe_plan(cfg, TOKENIZER_CFG)  # the dry run finds it too


def test_a_local_dataset_directory_counts_by_its_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "my_dataset" / "data" / "train-00000.jsonl"
    data.parent.mkdir(parents=True)
    data.write_bytes(jsonl_bytes(DOCS))
    cfg = data_cfg(tmp_path / "unused", tmp_path / "ds")
    cfg["sources"] = [{"hf": str(tmp_path / "my_dataset")}]
    before = read_manifest(prepare(cfg, TOKENIZER_CFG)).data["source"]["fingerprint"]
    data.write_bytes(jsonl_bytes(DOCS[:6]))  # edited in place: the dataset must be rebuilt
    after = read_manifest(prepare(cfg, TOKENIZER_CFG)).data
    assert after["source"]["fingerprint"] != before and after["stats"]["documents_read"] == 6


def test_a_dataset_saved_to_disk_is_read_by_split(tmp_path):
    import datasets

    train = datasets.Dataset.from_dict({"text": DOCS[:7]})
    test = datasets.Dataset.from_dict({"text": DOCS[7:]})
    train.save_to_disk(str(tmp_path / "one"), num_shards=2)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "both"))
    units = read_units({"hf": str(tmp_path / "one")}, 0)
    assert len(units) == 2 and texts({"hf": str(tmp_path / "one")}) == DOCS[:7]
    assert texts({"hf": str(tmp_path / "both"), "hf_split": "test"}) == DOCS[7:]
    with pytest.raises(ValueError, match=r"both has no split 'validation' \(has \['test', 'train'\]\)"):
        texts({"hf": str(tmp_path / "both"), "hf_split": "validation"})


def test_a_dataset_saved_to_disk_is_checked_before_any_work(tmp_path):
    import datasets

    from data_pipelines.sources import check_source

    datasets.Dataset.from_dict({"id": list(range(7)), "content": DOCS[:7]}).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS})}).save_to_disk(str(tmp_path / "both"))
    check_source({"hf": str(tmp_path / "one"), "text_field": "content"}, 0)
    for spec, message in (
        ({"hf": str(tmp_path / "one")}, r"one: has no column 'text' \(text columns: \['content'\]\); set "
                                         r"data.sources.1.text_field"),
        ({"hf": str(tmp_path / "one"), "text_field": "id"}, r"one: column 'id' holds .*int64.*, not text"),
        ({"hf": str(tmp_path / "one"), "hf_split": "validation"},
         r"one holds one dataset, not splits: data.sources.1.hf_split=validation does not apply"),
        ({"hf": str(tmp_path / "both"), "hf_split": "test"}, r"both has no split 'test' \(has \['train'\]\); set "
                                                              r"data.sources.1.hf_split"),
    ):
        with pytest.raises(ValueError, match=message):
            check_source(spec, 1)
    with pytest.raises(ValueError, match="has no column 'text'"):  # prepare and its dry run check before any work
        describe_plan(data_cfg(tmp_path / "unused", tmp_path / "ds", sources=[{"hf": str(tmp_path / "one")}]),
                      TOKENIZER_CFG)


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "a.parquet"])
def test_records_say_how_far_into_their_file_reading_got(tmp_path, name):
    """What the progress line's ETA is made of, so a source of one big file has one too."""
    WRITERS[name](tmp_path / name)
    size = (tmp_path / name).stat().st_size
    positions = [r.pos for u in read_units({"path": str(tmp_path / name)}, 0) for r in read_unit(u)]
    assert positions == sorted(positions) and 0 < positions[-1] <= size
    if name in ("a.jsonl", "a.parquet"):
        assert positions[0] < size // 2 and positions[-1] == size


SEPARATED = "Once upon a time.\n<|endoftext|>\nThe end came.\n\n<|endoftext|>\n<|endoftext|>\n\nA third, on line 8.\n"


@pytest.mark.parametrize("name, write", [
    ("s.txt", lambda p, raw: p.write_bytes(raw)),
    ("s.txt.gz", lambda p, raw: p.write_bytes(gzip.compress(raw))),
    ("s.txt.zst", lambda p, raw: p.write_bytes(zstandard.compress(raw))),
])
def test_a_separator_splits_txt_files_into_documents_with_the_line_each_starts_on(tmp_path, name, write):
    write(tmp_path / name, SEPARATED.encode())
    spec = {"path": str(tmp_path / name), "separator": "<|endoftext|>"}
    records = [r for u in read_units(spec, 0) for r in read_unit(u)]
    # Line breaks around a document go, and so does an empty one between two separators.
    assert [(r.text, r.origin) for r in records] == [
        ("Once upon a time.", f"{tmp_path / name}:1"), ("The end came.", f"{tmp_path / name}:3"),
        ("A third, on line 8.", f"{tmp_path / name}:8")]
    assert texts({"path": str(tmp_path / name)}) == [SEPARATED]  # without one: the file is one document


def test_a_separator_and_windows_line_ends_are_found_wherever_the_blocks_read_cut_them():
    import io

    from data_pipelines.sources import _lf_blocks, _split_bytes

    raw = "é<sep>ab<sep><sep>東京 <se <sep>\U0001F600<sep>".encode()
    crlf = b"one\r\n\r\ntwo\r\nlines\r\n\r\n\r\nthree\r"
    for block in range(1, 12):
        stream = io.BytesIO(raw)
        assert list(_split_bytes(_lf_blocks(stream, stream.read(4), block), b"<sep>")) == raw.split(b"<sep>")
        stream = io.BytesIO(crlf)
        assert list(_split_bytes(_lf_blocks(stream, stream.read(4), block), b"\n\n")) == [
            b"one", b"two\nlines", b"\nthree\r"]


def test_separator_escapes_bad_bytes_and_wide_encodings(tmp_path):
    import codecs

    (tmp_path / "p.txt").write_bytes(b"\xef\xbb\xbfcaf\xe9\n\nsecond \xef\xbf\xbd paragraph\n\n\nthird")
    spec = {"path": str(tmp_path / "p.txt"), "separator": "\\n\\n"}  # as a command-line override keeps it
    records = [r for u in read_units(spec, 0) for r in read_unit(u)]
    # The mark goes; the bad byte counts in its own document, a genuine U+FFFD in none.
    assert [(r.text, r.replaced) for r in records] == [
        ("caf\ufffd", 1), ("second \ufffd paragraph", 0), ("third", 0)]
    # Windows' line ends: its paragraphs are found by "\n\n" too (and by "\r\n\r\n").
    (tmp_path / "crlf.txt").write_bytes(b"First paragraph.\r\n\r\nSecond,\r\non two lines.\r\n\r\nThird.\r\n")
    for separator in ("\\n\\n", "\r\n\r\n"):
        records = [r for u in read_units({"path": str(tmp_path / "crlf.txt"), "separator": separator}, 0)
                   for r in read_unit(u)]
        assert [(r.text, r.origin[-2:]) for r in records] == [
            ("First paragraph.", ":1"), ("Second,\non two lines.", ":3"), ("Third.", ":6")]
    (tmp_path / "w.txt").write_bytes(codecs.BOM_UTF16_LE + "東京\n\nnext one\n\n".encode("utf-16-le"))
    records = [r for u in read_units({**spec, "path": str(tmp_path / "w.txt")}, 0) for r in read_unit(u)]
    assert [(r.text, r.origin[-2:]) for r in records] == [("東京", ":1"), ("next one", ":3")]


def test_a_separator_where_it_can_split_nothing_is_refused_before_any_work(tmp_path):
    from cluster.config import ConfigError, compose_config

    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes(DOCS))
    with pytest.raises(ValueError, match=r"data.sources.0.separator: splits .txt files into documents, and data "
                                         r"source 'a' has none \(.*a.jsonl ...\): leave it out"):
        check_files({"name": "a", "path": str(tmp_path / "a.jsonl"), "separator": "\n"}, 0)
    for source, value in (("{name:a,path:a.txt,separator:''}", "''"), ("{name:h,hf:org/set,separator:x}", "'x'")):
        with pytest.raises(ConfigError, match=rf"data.sources\[0\].separator={value}: splits the .txt files of a "
                                              r"`path` source"):
            compose_config([f"data.sources=[{source}]"])


def test_the_separator_setting_leaves_older_run_names_and_datasets_as_they_were():
    from cluster.config import compose_config, derive_run_name
    from data_pipelines.prepare import build_settings, dataset_fingerprint

    cfg = compose_config([])
    before = {**cfg, "data": {**cfg["data"], "sources": [
        {k: v for k, v in s.items() if k != "separator"} for s in cfg["data"]["sources"]]}}
    assert derive_run_name(cfg) == derive_run_name(before)
    assert dataset_fingerprint(cfg["data"], cfg["tokenizer"]) == dataset_fingerprint(before["data"], cfg["tokenizer"])
    assert build_settings(cfg["data"], cfg["tokenizer"]) == build_settings(before["data"], cfg["tokenizer"])  # resumes
    split = {**cfg, "data": {**cfg["data"], "sources": [{**s, "separator": "\n\n"} for s in cfg["data"]["sources"]]}}
    assert derive_run_name(split) != derive_run_name(cfg)
    assert dataset_fingerprint(split["data"], cfg["tokenizer"]) != dataset_fingerprint(cfg["data"], cfg["tokenizer"])
    # The command line's spelling of a separator (escapes kept as typed) and YAML's are one setting.
    typed = {**cfg, "data": {**cfg["data"], "sources": [{**s, "separator": "\\n\\n"} for s in cfg["data"]["sources"]]}}
    assert derive_run_name(typed) == derive_run_name(split)
    assert dataset_fingerprint(typed["data"], cfg["tokenizer"]) == dataset_fingerprint(split["data"], cfg["tokenizer"])
    assert build_settings(typed["data"], cfg["tokenizer"]) == build_settings(split["data"], cfg["tokenizer"])


def test_a_txt_file_of_separated_documents_prepares_each_as_its_own(tmp_path):
    corpus = tmp_path / "stories.txt"
    corpus.write_text("".join(f"{d}\n<|endoftext|>\n" for d in DOCS))
    cfg = data_cfg(corpus, tmp_path / "ds", sources=[{"path": str(corpus), "separator": "<|endoftext|>"}])
    assert "1 file(s), 0.0 MB, .txt documents split at '<|endoftext|>'" in describe_plan(cfg, TOKENIZER_CFG)
    stats = read_manifest(prepare(cfg, TOKENIZER_CFG)).data["stats"]
    assert stats["documents_kept"] == len(set(DOCS))

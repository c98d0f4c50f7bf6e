"""Cleaning, filters and deduplication, as counted in the manifest."""

import json

import pytest

from corpus import TOKENIZER_CFG, data_cfg, make_documents, write_jsonl
from data_pipelines.cleaning import clean_text, dedup_key, filter_length
from data_pipelines.manifest import read_manifest
from data_pipelines.prepare import prepare
from data_pipelines.progress import Progress


def test_clean_text_normalises_to_nfc_and_drops_control_characters():
    assert clean_text("cafe\u0301\x00 ok\x07\tnext\nline\x7f") == "caf\u00e9 ok\tnext\nline"


def test_length_filter_counts_lowercased_text_without_punctuation():
    assert filter_length("Hello, World!!!") == len("hello world")
    assert filter_length("...!!!???") == 0


def test_dedup_key_ignores_whitespace_runs_only():
    assert dedup_key("a  b\n c") == dedup_key("a b c")
    assert dedup_key("a b c") != dedup_key("A b c")


def test_filters_and_dedup_are_applied_and_counted(tmp_path):
    docs = make_documents(30, min_words=40, max_words=60)
    extra = [docs[0].replace(" ", "  "), "Too short.", "!!! ??? ...", "", "\x00\x01\x02"]
    corpus = write_jsonl(tmp_path / "c.jsonl", docs + extra)
    cfg = data_cfg(corpus, tmp_path / "ds", filters={"min_chars": 50, "min_tokens": 0, "dedup": True})
    stats = read_manifest(prepare(cfg, TOKENIZER_CFG)).data["stats"]
    assert stats["dropped"] == {"duplicate": 1, "too_few_characters": 2, "empty": 2}
    assert stats["documents_kept"] == 30


def test_token_filter_and_dedup_off(tmp_path):
    docs = make_documents(30, min_words=5, max_words=200)
    corpus = write_jsonl(tmp_path / "c.jsonl", docs + docs[:3])
    cfg = data_cfg(corpus, tmp_path / "ds", filters={"min_chars": 0, "min_tokens": 100, "dedup": False})
    stats = read_manifest(prepare(cfg, TOKENIZER_CFG)).data["stats"]
    assert "duplicate" not in stats["dropped"]
    assert stats["dropped"]["too_few_tokens"] > 0
    assert stats["documents_kept"] + stats["dropped"]["too_few_tokens"] == 33


def test_replaced_characters_are_counted_in_the_manifest(tmp_path):
    docs = make_documents(20)
    raw = b"".join(json.dumps({"text": d}).encode() + b"\n" for d in docs)
    raw += b'{"text": "bad \xff\xfe bytes and more words to keep this document"}\n'
    raw += b'{"text": "half an emoji \\ud83d escaped in JSON, and more words to keep it"}\n'  # no UTF-8 holds it
    (tmp_path / "c.jsonl").write_bytes(raw)
    stats = read_manifest(prepare(data_cfg(tmp_path / "c.jsonl", tmp_path / "ds"), TOKENIZER_CFG)).data["stats"]
    assert stats["replaced_characters"] == 3 and stats["documents_kept"] == 22


def test_progress_line_shows_rates_and_eta(capsys):
    import io

    stream = io.StringIO()
    p = Progress("prepare x", every_s=0, stream=stream)
    p.update({"docs": 2000, "tokens": 3_000_000}, done_fraction=0.25)
    line = stream.getvalue()
    Progress("past", every_s=0, stream=stream).update({"docs": 1}, done_fraction=1.02)  # a source one past its share
    assert stream.getvalue().endswith("ETA 0s\n")
    stream.truncate(len(line))
    stream.seek(len(line))
    assert line.startswith("[prepare x] 2.0k docs (") and "/s), 3.0M tokens (" in line and "ETA" in line
    p.update({"docs": 2000, "tokens": 3_000_000}, force=True)  # the end, with nothing new: no second line
    assert stream.getvalue() == line
    p.update({"docs": 2001, "tokens": 3_000_100}, force=True)
    assert stream.getvalue().count("\n") == 2


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_tokenizer_kinds_frame_documents_with_their_bos_and_eos(tmp_path, kind):
    import numpy as np
    import webdataset as wds

    from data_pipelines.tokenizer import load_tokenizer

    docs = make_documents(200, seed=5)
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    tok_cfg = TOKENIZER_CFG
    if kind == "sentencepiece":
        import sentencepiece as spm

        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(docs), model_prefix=str(tmp_path / "sp"), vocab_size=90, bos_id=1, eos_id=2,
            unk_id=0, pad_id=-1, character_coverage=1.0, minloglevel=2,
        )
        tok_cfg = {"kind": "sentencepiece", "vocab_size": 90, "path": str(tmp_path / "sp.model")}
    out = prepare(data_cfg(corpus, tmp_path / "ds", val_fraction=0.0), tok_cfg)
    m = read_manifest(out)
    assert m.data["tokenizer"]["kind"] == ("hf" if kind == "bpe" else "sentencepiece")
    assert (m.data["tokenizer"]["bos_id"], m.data["tokenizer"]["eos_id"]) == (1, 2)
    tok = load_tokenizer(m.tokenizer_path)
    stream = np.concatenate([s["tokens.npy"] for s in wds.WebDataset(str(out / m.shards("train")[0].name), shardshuffle=False).decode()])
    assert stream[0] == 1
    first = stream[1 : int(np.argmax(stream == 2))]
    assert tok.decode(first.tolist()) == docs[0]


def test_a_vocabulary_beyond_uint16_writes_uint32_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 70_000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    docs = [" ".join(f"w{(i * 1777 + j * 1301) % 69_997 + 3}" for j in range(50)) for i in range(40)]
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    out = prepare(
        data_cfg(corpus, tmp_path / "ds", val_fraction=0.0),
        {"kind": "file", "vocab_size": 70_000, "path": str(tmp_path / "tokenizer.json")},
    )
    m = read_manifest(out)
    assert m.dtype == "uint32"
    from data_pipelines.loader import TokenLoader

    batch = next(TokenLoader(out, "train", 0, 1, batch_size=m.num_samples("train"), seed=0, shuffle=False))
    assert batch.max().item() > 65_535
    assert batch[0, 1].item() == vocab[docs[0].split()[0]]


def test_a_tokenizer_with_gaps_in_its_ids_is_sized_by_its_highest_id(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from data_pipelines.loader import TokenLoader

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 70_000}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    corpus = write_jsonl(tmp_path / "c.jsonl", ["hello world " * 20] * 5)
    cfg = data_cfg(corpus, tmp_path / "ds", val_fraction=0.0, filters={"min_chars": 0, "min_tokens": 0, "dedup": False})
    with pytest.raises(ValueError, match="set tokenizer.vocab_size=70001"):  # 5 tokens, but an id of 70,000
        prepare(cfg, {"kind": "file", "vocab_size": 5, "path": str(tmp_path / "tokenizer.json")})
    out = prepare(cfg, {"kind": "file", "vocab_size": 70_001, "path": str(tmp_path / "tokenizer.json")})
    assert read_manifest(out).dtype == "uint32"
    batch = next(TokenLoader(out, "train", 0, 1, batch_size=1, seed=0, shuffle=False))
    assert batch[0, 1:5].tolist() == [3, 70_000, 3, 70_000]  # stored as it is, not wrapped into 16 bits


def test_a_given_tokenizer_without_bos_and_eos_is_refused_before_any_work(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from data_pipelines.prepare import describe_plan

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "hello": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = data_cfg(write_jsonl(tmp_path / "c.jsonl", ["hello"] * 5), tmp_path / "ds")
    tok_cfg = {"kind": "file", "vocab_size": 4, "path": str(tmp_path / "tokenizer.json")}
    message = f"tokenizer {tmp_path / 'tokenizer.json'}: it has no <s> or </s> token, which packing puts around"
    with pytest.raises(ValueError, match=message):
        describe_plan(cfg, tok_cfg)  # the dry run
    capsys.readouterr()
    with pytest.raises(ValueError, match=message):
        prepare(cfg, tok_cfg)
    assert "[prepare" not in capsys.readouterr().out  # nothing read, trained or tokenized first


def test_a_given_tokenizer_larger_than_configured_is_refused(tmp_path, tiny_dataset):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(10))
    path = str(read_manifest(tiny_dataset).tokenizer_path)
    with pytest.raises(ValueError, match="set tokenizer.vocab_size=300"):
        prepare(data_cfg(corpus, tmp_path / "ds"), {"kind": "file", "vocab_size": 100, "path": path})

"""Mixture weights are shares of output tokens; exhaustion is an error unless a source may repeat."""

import pytest

from cluster.cli import main
from corpus import TOKENIZER_CFG, data_cfg, make_documents, write_jsonl
from data_pipelines.manifest import read_manifest
from data_pipelines.prepare import prepare


def two_sources(tmp_path, weights, repeat=(False, False)):
    # Long documents in one source, short in the other: document counts and token shares differ a lot.
    long_docs = write_jsonl(tmp_path / "long.jsonl", make_documents(150, seed=1, min_words=150, max_words=300))
    short_docs = write_jsonl(tmp_path / "short.jsonl", make_documents(400, seed=2, min_words=5, max_words=30))
    cfg = data_cfg(long_docs, tmp_path / "ds")
    cfg["sources"] = [
        {"name": "long", "path": str(long_docs), "weight": weights[0], "repeat": repeat[0]},
        {"name": "short", "path": str(short_docs), "weight": weights[1], "repeat": repeat[1]},
    ]
    return cfg


def shares(out):
    return {s["name"]: s["share"] for s in read_manifest(out).data["stats"]["sources"]}


@pytest.mark.parametrize("weights", [(0.7, 0.3), (2, 1)])
def test_weights_are_shares_of_output_tokens(tmp_path, weights):
    cfg = two_sources(tmp_path, weights)
    cfg["target_tokens"] = 60_000
    out = prepare(cfg, TOKENIZER_CFG)
    stats = read_manifest(out).data["stats"]
    assert 60_000 <= stats["tokens"] < 62_000
    expected = weights[0] / sum(weights)
    assert shares(out)["long"] == pytest.approx(expected, abs=0.02)
    assert shares(out)["short"] == pytest.approx(1 - expected, abs=0.02)


def test_an_exhausted_source_is_an_error_naming_it(tmp_path):
    cfg = two_sources(tmp_path, (0.5, 0.5))
    cfg["target_tokens"] = 80_000  # "short" holds far fewer than 40k tokens
    with pytest.raises(ValueError, match=(
        r"data source 'short' holds [\d,]+ tokens after filtering, short of its share of 40,000 of "
        r"data.target_tokens=80,000; let it be read again \(data.sources.1.repeat=true\)"
    )):
        prepare(cfg, TOKENIZER_CFG)
    assert not (tmp_path / "ds").exists()


def test_a_source_allowed_to_repeat_is_read_again(tmp_path):
    cfg = two_sources(tmp_path, (0.5, 0.5), repeat=(False, True))
    cfg["target_tokens"] = 80_000
    out = prepare(cfg, TOKENIZER_CFG)
    sources = read_manifest(out).data["stats"]["sources"]
    assert sources[1]["repeats"] >= 1 and sources[0]["repeats"] == 0
    assert shares(out)["short"] == pytest.approx(0.5, abs=0.02)


def test_without_a_target_every_document_is_used_once(tmp_path):
    cfg = two_sources(tmp_path, (0.9, 0.1))
    stats = read_manifest(prepare(cfg, TOKENIZER_CFG)).data["stats"]
    for s in stats["sources"]:
        assert s["tokens_used"] == s["tokens_kept"] and s["repeats"] == 0


def test_weights_a_full_pass_misses_are_named_with_a_target_that_holds_them(tmp_path, capsys):
    cfg = two_sources(tmp_path, (0.5, 0.5))
    out = prepare(cfg, TOKENIZER_CFG)
    got = shares(out)
    printed = capsys.readouterr().out
    assert (f"every document is used once, so the shares follow the sources' sizes: long {got['long']:.1%} "
            f"(weight 50.0%), short {got['short']:.1%} (weight 50.0%)") in printed
    cfg["target_tokens"] = int(printed.split("data.target_tokens=")[-1].split()[0])
    cfg["dir"] = str(tmp_path / "held")
    assert shares(prepare(cfg, TOKENIZER_CFG)) == pytest.approx({"long": 0.5, "short": 0.5}, abs=0.02)
    assert "note:" not in capsys.readouterr().out


def test_a_source_stops_tokenizing_once_its_share_is_covered(tmp_path):
    cfg = two_sources(tmp_path, (0.5, 0.5))
    cfg["target_tokens"] = 2_000
    stats = read_manifest(prepare(cfg, TOKENIZER_CFG)).data["stats"]
    assert stats["sources"][0]["documents_read"] < 150 and stats["sources"][1]["documents_read"] < 400


def test_openelm_mix_dry_run_lists_every_source_without_network(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["prepare", "data=openelm_mix", "prepare.dry_run=true", f"storage_path={tmp_path}"]) == 0
    out = capsys.readouterr().out
    spec_tokens = {  # SPEC table, billions of tokens
        "refinedweb": 665, "redpajama_github": 59, "redpajama_books": 26, "redpajama_arxiv": 28,
        "redpajama_wikipedia": 24, "redpajama_stackexchange": 20, "redpajama_c4": 175, "pile_dedup": 207,
        "dolma_stack": 411, "dolma_reddit": 89, "dolma_pes2o": 70, "dolma_gutenberg": 6, "dolma_wiki": 4.3,
    }
    total = sum(spec_tokens.values())
    for name, tokens in spec_tokens.items():
        assert f"  {name}: weight {tokens / total:.2%}" in out, name
    for dataset in ("tiiuae/falcon-refinedweb", "togethercomputer/RedPajama-Data-1T", "EleutherAI/the_pile_deduplicated", "allenai/dolma"):
        assert dataset in out
    assert "min 200 characters, min 256 tokens" in out
    assert not list(tmp_path.iterdir())


def test_a_weight_zero_source_is_not_read(tmp_path):
    cfg = two_sources(tmp_path, (1, 0))
    stats = read_manifest(prepare(cfg, TOKENIZER_CFG)).data["stats"]["sources"]
    assert stats[1]["documents_read"] == 0 and stats[1]["tokens_used"] == 0 and stats[0]["share"] == 1.0


def test_a_weight_0_source_does_not_shape_the_vocabulary(tmp_path):
    from data_pipelines.prepare import build_tokenizer

    cfg = two_sources(tmp_path, (1, 0))
    alone = {**cfg, "sources": cfg["sources"][:1]}
    assert build_tokenizer(cfg, TOKENIZER_CFG).vocabulary() == build_tokenizer(alone, TOKENIZER_CFG).vocabulary()
    with_both = {**cfg, "sources": [cfg["sources"][0], {**cfg["sources"][1], "weight": 1}]}
    assert build_tokenizer(with_both, TOKENIZER_CFG).vocabulary() != build_tokenizer(alone, TOKENIZER_CFG).vocabulary()

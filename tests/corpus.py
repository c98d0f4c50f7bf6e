"""Small generated corpora for data tests: real files, deterministic content."""

import json
import random
from pathlib import Path

WORDS = (
    "the a database table index query row column page file lock journal write read commit "
    "transaction schema value key select insert update delete where order group by join "
    "virtual machine cursor btree record header cache memory disk sqlite function"
).split()


def make_documents(n: int, seed: int = 0, min_words: int = 20, max_words: int = 120) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        docs.append(f"Document {i}. " + " ".join(words) + ".")
    return docs


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"id": i, field: text}) + "\n")
    return path


def data_cfg(corpus: Path, out: Path, **overrides) -> dict:
    cfg = {
        "name": "generated",
        "sources": [{"path": str(corpus), "text_field": "text"}],
        "seq_len": 32,
        "val_fraction": 0.1,
        "samples_per_shard": 64,
        "shard_bytes": None,
        "target_tokens": None,
        "filters": {"min_chars": 0, "min_tokens": 0, "dedup": True},
        "on_bad_record": "skip",
        "workers": 0,
        "dir": str(out),
    }
    return {**cfg, **overrides}


TOKENIZER_CFG = {"kind": "bpe", "vocab_size": 300, "path": None}

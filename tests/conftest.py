import os
import sys
from pathlib import Path

# The reference model and helpers beside the tests are imported as plain modules.
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402

from corpus import TOKENIZER_CFG, data_cfg, make_documents, write_jsonl  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A prepared dataset of several real shards (seq_len 32, BPE vocab 300), shared by the session."""
    from data_pipelines.prepare import prepare

    root = tmp_path_factory.mktemp("tiny")
    corpus = write_jsonl(root / "corpus.jsonl", make_documents(300))
    return prepare(data_cfg(corpus, root / "dataset"), TOKENIZER_CFG)

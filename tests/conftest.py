import os
import sys
from pathlib import Path

# The reference model and helpers beside the tests are imported as plain modules.
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_SILENT", "true")
# Ray Train's controller collects a worker's report when it polls, every 2 s by default, and a
# worker's next report waits for that: the tests' steps take milliseconds and report often. Every
# Ray process started here (embedded, a head, a CLI subprocess) inherits this.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

import pytest  # noqa: E402

from corpus import TOKENIZER_CFG, data_cfg, make_documents, write_jsonl  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A prepared dataset of several real shards (seq_len 32, BPE vocab 300), shared by the session."""
    from data_pipelines.prepare import prepare

    root = tmp_path_factory.mktemp("tiny")
    corpus = write_jsonl(root / "corpus.jsonl", make_documents(300))
    return prepare(data_cfg(corpus, root / "dataset"), TOKENIZER_CFG)

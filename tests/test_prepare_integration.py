"""prepare end to end: the same bytes whatever the number of Ray Data tokenizer actors, errors
surfacing by name from inside Ray, and a killed run that leaves nothing looking complete."""

import os
import signal
import subprocess
import sys
import time

import pytest

from corpus import TOKENIZER_CFG, data_cfg, make_documents, write_jsonl
from data_pipelines.manifest import read_manifest
from data_pipelines.prepare import prepare

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from cluster.config import compose_config
    from cluster.ray_runtime import connect

    connect(compose_config([])["cluster"])  # embedded, 4 logical CPUs
    yield
    ray.shutdown()


def test_shards_are_byte_identical_for_any_number_of_workers(tmp_path, ray_local, capfd, recwarn):
    from ray.util.debug import reset_log_once

    reset_log_once()  # Ray Data warns once per process: as if this were the first pipeline
    corpus_dir = tmp_path / "corpus"
    for i in range(3):  # several files: several read tasks feeding the actor pool
        write_jsonl(corpus_dir / f"part-{i}.jsonl", make_documents(150, seed=10 + i))
    checksums = {}
    for workers in (0, 1, 2):
        cfg = data_cfg(corpus_dir / "*.jsonl", tmp_path / f"ds{workers}", workers=workers)
        m = read_manifest(prepare(cfg, TOKENIZER_CFG))
        checksums[workers] = [s.sha256 for split in ("train", "val") for s in m.shards(split)]
        assert m.data["stats"]["documents_read"] == 450
    assert checksums[0] == checksums[1] == checksums[2]
    printed = "".join(capfd.readouterr())
    assert "[prepare " in printed and "Progress bars disabled" not in printed
    assert "max_restarts > 0" not in printed  # Ray's error-level line about restarting the tokenizer actors
    # How max_restarts=0 is given: a warning of no use to the user, on every build.
    assert not [w for w in recwarn if "ray_remote_args" in str(w.message)]


def test_more_tokenizer_actors_than_ray_can_place_are_refused_at_once(tmp_path, ray_local):
    write_jsonl(tmp_path / "c.jsonl", make_documents(20, seed=2))
    cfg = data_cfg(tmp_path / "c.jsonl", tmp_path / "ds", workers=4)  # and a reader: 4.25 of 4 CPUs
    with pytest.raises(ValueError, match=r"data.workers=4 tokenizer actors of 1 CPU and a reader of 0.25 need "
                                         r"4.25 CPUs, more than the 4 this Ray has: lower data.workers"):
        prepare(cfg, TOKENIZER_CFG)
    assert not (tmp_path / "ds").exists()
    # Readers run as a pool of tasks: one beside the actors is room enough, however many actors.
    from data_pipelines.tokenize_stage import _require_room

    _require_room(65, 66)  # data.workers null on a 66-CPU node: its CPUs less one
    _require_room(8, 4, can_grow=True)  # a cluster of several nodes may grow: said, not refused
    # The default (null) takes what fits: Ray's CPUs less one, at most this machine's cores.
    assert read_manifest(prepare({**cfg, "workers": None}, TOKENIZER_CFG)).data["stats"]["documents_read"] == 20


def test_errors_inside_ray_workers_name_the_record(tmp_path, ray_local):
    (tmp_path / "c.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    cfg = data_cfg(tmp_path / "c.jsonl", tmp_path / "ds", workers=2, on_bad_record="error")
    with pytest.raises(ValueError, match=r"c\.jsonl:2: bad record \(missing_text_field: no field 'text'") as raised:
        prepare(cfg, {"kind": "file", "vocab_size": 300, "path": _tokenizer(tmp_path)})
    assert "\n" not in str(raised.value), str(raised.value)  # ours alone, without Ray's advice on retries


def _tokenizer(tmp_path):
    from data_pipelines.tokenizer import train_bpe

    return str(train_bpe(make_documents(50), 300).save(tmp_path))


def test_a_killed_prepare_leaves_nothing_that_looks_complete(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(6_000, min_words=50, max_words=200))
    out = tmp_path / "ds"
    tok = {"kind": "file", "vocab_size": 300, "path": _tokenizer(tmp_path)}
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from corpus import data_cfg; from data_pipelines.prepare import prepare;"
        f"prepare(data_cfg({str(corpus)!r}, {str(out)!r}, samples_per_shard=16), {tok!r})"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, os.path.dirname(__file__)])
    deadline = time.time() + 120
    while not any((tmp_path).glob(".ds.tmp-*/train/shard-*.tar")) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    assert list(tmp_path.glob(".ds.tmp-*")), "the killed run's temporary directory should be there"
    prepare(data_cfg(corpus, out, samples_per_shard=16), tok)  # the next run cleans up and completes
    assert (out / "manifest.json").exists() and not list(tmp_path.glob(".ds.tmp-*"))


def test_an_up_to_date_dataset_starts_no_ray(tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_documents(100, seed=5))
    cmd = [sys.executable, "-m", "cluster.cli", "prepare", f"storage_path={tmp_path}",
           f"data.sources=[{{name:gen,path:{corpus}}}]"]
    subprocess.run([*cmd, "data.workers=0"], check=True, capture_output=True, timeout=300)
    again = subprocess.run([*cmd, "data.workers=2"], capture_output=True, text=True, timeout=300)  # would use Ray
    assert again.returncode == 0, again.stderr[-3000:]
    assert "is up to date" in again.stdout and "[ray]" not in again.stdout + again.stderr

"""Evaluation: exact token-weighted loss, validation batches across ranks, checkpoint vs HF export, text files."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from corpus import make_documents, write_jsonl
from data_pipelines.manifest import read_manifest
from data_pipelines.tokenizer import load_tokenizer
from test_model import small_config
from test_train_loop import small_cfg
from trainer.checkpoint import read_client_state
from trainer.distributed import free_port, init_distributed
from trainer.evaluate import (
    evaluate_loss,
    load_for_eval,
    text_batches,
    validation_batches,
)
from trainer.hf import export_checkpoints
from trainer.loss import lm_loss
from trainer.model import OpenELMConfig, build_model
from trainer.train_loop import train


def rows(batches) -> list[tuple[int, ...]]:
    return [tuple(r.tolist()) for b in batches for r in b]


# ---------------------------------------------------------------------------- the mean


def uneven_batches() -> list[torch.Tensor]:
    """Unequal batch sizes: a mean of batch means would weight the single-row batch 3x too much."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 97, (b, 9), generator=gen) for b in (1, 3, 2)]


@pytest.mark.parametrize("chunk", [4096, 5])  # a batch's tokens in one slice, and in slices that do not divide it
def test_loss_is_the_token_weighted_mean_over_all_batches(chunk, monkeypatch):
    monkeypatch.setattr("trainer.evaluate.EVAL_CHUNK_TOKENS", chunk)
    model = build_model(small_config(), seed=0)
    batches = uneven_batches()
    result = evaluate_loss(model, batches, "cpu", z_loss_weight=1e-2)

    everything = torch.cat(batches)
    with torch.no_grad():
        total, ce = lm_loss(model(everything[:, :-1]), everything[:, 1:], 1e-2)
    assert result["tokens"] == 6 * 8
    assert result["ce_loss"] == pytest.approx(ce.item(), rel=1e-6)
    assert result["loss"] == pytest.approx(total.item(), rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(result["ce_loss"]), rel=1e-12)
    assert result["ce_sum"] == pytest.approx(result["ce_loss"] * 48, rel=1e-12)
    mean_of_means = np.mean([evaluate_loss(model, [b], "cpu")["ce_loss"] for b in batches])
    assert abs(mean_of_means - result["ce_loss"]) > 1e-4  # the test can tell the two apart


def test_evaluation_restores_the_training_mode_and_keeps_no_graph():
    model = build_model(small_config(), seed=0).train()
    batch = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    evaluate_loss(model, [batch], "cpu")
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    evaluate_loss(model.eval(), [batch], "cpu")
    assert not model.training


def test_no_batches_is_an_error():
    with pytest.raises(ValueError, match="no tokens"):
        evaluate_loss(build_model(small_config(), seed=0), [], "cpu")


def test_distributed_evaluation_in_a_world_of_one():
    init_distributed(use_gpu=False)
    model = build_model(small_config(), seed=0)
    batches = [torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))]
    assert evaluate_loss(model, batches, "cpu", distributed=True) == evaluate_loss(model, batches, "cpu")


def _two_ranks(rank: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = build_model(small_config(), seed=0)
        batches = uneven_batches()
        got = evaluate_loss(model, batches[:1] if rank == 0 else batches[1:], "cpu", distributed=True)
        want = evaluate_loss(model, batches, "cpu")
        assert got["tokens"] == want["tokens"]
        assert got["ce_loss"] == pytest.approx(want["ce_loss"], rel=1e-12)
    finally:
        dist.destroy_process_group()


def test_ranks_with_unequal_token_counts_give_the_exact_global_mean():
    # A failed assertion in a rank fails start_processes with that rank's traceback.
    mp.start_processes(_two_ranks, args=(free_port(),), nprocs=2, start_method="spawn")


# ---------------------------------------------------------------------------- validation batches


def test_validation_batches_give_every_rank_the_same_count_and_never_repeat(tiny_dataset):
    n = read_manifest(tiny_dataset).num_samples("val")
    world, batch_size = 3, 4
    per_rank = [list(validation_batches(tiny_dataset, r, world, batch_size)) for r in range(world)]
    assert [len(b) for b in per_rank] == [n // world // batch_size] * world
    assert all(b.shape == (batch_size, 33) for batches in per_rank for b in batches)
    seen = [row for batches in per_rank for row in rows(batches)]
    assert len(seen) == len(set(seen)) == world * (n // world // batch_size) * batch_size

    again = list(validation_batches(tiny_dataset, 1, world, batch_size))  # unshuffled: the same every time
    assert all(torch.equal(a, b) for a, b in zip(again, per_rank[1]))
    assert len(list(validation_batches(tiny_dataset, 0, world, batch_size, max_batches=2))) == 2


def test_validation_data_of_another_tokenizer_is_refused(tiny_dataset):
    with pytest.raises(ValueError, match="was tokenized with tokenizer"):
        validation_batches(tiny_dataset, 0, 1, 4, tokenizer_fingerprint="0" * 64)


def test_a_runs_validation_refuses_its_dataset_rebuilt_in_place(tmp_path):
    from corpus import TOKENIZER_CFG, data_cfg
    from data_pipelines.prepare import prepare

    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(120))
    dataset = prepare(data_cfg(corpus, tmp_path / "ds", val_fraction=0.3), TOKENIZER_CFG)
    started_on = read_manifest(dataset).data["source"]["fingerprint"]  # as a run finds it at its start
    assert len(list(validation_batches(dataset, 0, 1, 4, max_batches=1, dataset_fingerprint=started_on))) == 1
    # Rebuilt with another seq_len: the same tokenizer (trained on the same text), other samples.
    prepare(data_cfg(corpus, tmp_path / "ds", val_fraction=0.3, seq_len=16), TOKENIZER_CFG)
    with pytest.raises(ValueError, match=f"ds was rebuilt while a run reads it \\(fingerprint {started_on[:12]}"):
        validation_batches(dataset, 0, 1, 4, dataset_fingerprint=started_on)


def test_a_val_split_smaller_than_one_batch_per_rank_is_an_error(tiny_dataset):
    n = read_manifest(tiny_dataset).num_samples("val")
    with pytest.raises(ValueError, match="fewer than one batch"):
        validation_batches(tiny_dataset, 0, 2, n)


# ---------------------------------------------------------------------------- checkpoints and exports


@pytest.fixture(scope="module")
def checkpoint(tiny_dataset, tmp_path_factory):
    """(model config, checkpoint dir) of a 2-step ZeRO-2 run."""
    cfg = small_cfg(tiny_dataset, tmp_path_factory.mktemp("run"), "logger=none", "train.max_steps=2",
                    "train.warmup_steps=1")
    return OpenELMConfig(**cfg["model"]), train(cfg)["checkpoint"]


def test_checkpoint_and_its_hf_export_evaluate_the_same(checkpoint, tiny_dataset, tmp_path):
    model_cfg, ckpt = checkpoint
    hf_dir = export_checkpoints([ckpt], tmp_path / "hf", model_cfg, tokenizer_dir=tiny_dataset)
    from_ckpt, ckpt_tokenizer = load_for_eval(ckpt)
    from_hf, hf_tokenizer = load_for_eval(hf_dir)
    assert not from_ckpt.training and not from_hf.training
    results = [evaluate_loss(m, validation_batches(tiny_dataset, 0, 1, 4, max_batches=3), "cpu")
               for m in (from_ckpt, from_hf)]
    assert results[0] == results[1]
    assert results[0]["tokens"] == 3 * 4 * 32 and math.isfinite(results[0]["ce_loss"])
    dataset_tokenizer = load_tokenizer(tiny_dataset / "tokenizer.json")
    assert ckpt_tokenizer.fingerprint == dataset_tokenizer.fingerprint
    assert hf_tokenizer.same_ids_as(dataset_tokenizer)  # the export's also frames text with <s> for transformers


# ZeRO-0 keeps the weights in the client state's file; ZeRO-3 names that file differently.
@pytest.mark.parametrize("stage", [0, 3])
def test_other_zero_stages_load_for_eval(stage, checkpoint, tiny_dataset, tmp_path):
    cfg = small_cfg(tiny_dataset, tmp_path, "logger=none", "train.max_steps=2", "train.warmup_steps=1",
                    f"deepspeed=zero{stage}")
    model, tokenizer = load_for_eval(train(cfg)["checkpoint"])
    reference, _ = load_for_eval(checkpoint[1])  # the same run under ZeRO-2
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, atol=2e-7, rtol=1e-6, msg=name)
    assert tokenizer is not None


def test_client_state_holds_the_step_and_the_config(checkpoint):
    model_cfg, ckpt = checkpoint
    state = read_client_state(ckpt)
    assert state["step"] == 2 and OpenELMConfig(**state["config"]["model"]) == model_cfg


def test_model_cfg_overrides_a_checkpoints_config(checkpoint):
    model_cfg, ckpt = checkpoint
    wrong = OpenELMConfig(**{**model_cfg.__dict__, "model_dim": 32})
    with pytest.raises(ValueError, match="has shape"):
        load_for_eval(ckpt, wrong)


def test_neither_kind_of_directory_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: neither a Hugging Face directory"):
        load_for_eval(tmp_path)


def test_an_incomplete_checkpoint_is_refused(checkpoint, tmp_path):
    _, ckpt = checkpoint
    partial = tmp_path / "step_2"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").symlink_to(next(Path(ckpt).glob("*model_states.pt")))
    with pytest.raises(ValueError, match="no COMPLETE marker"):
        load_for_eval(partial)


# ---------------------------------------------------------------------------- text files


@pytest.fixture(scope="module")
def tokenizer(tiny_dataset):
    return load_tokenizer(tiny_dataset / "tokenizer.json")


def expected_samples(tokenizer, docs: list[str], seq_len: int) -> np.ndarray:
    bos, eos = tokenizer.special_ids()
    stream = [t for d in docs for t in [bos, *tokenizer.encode_batch([d])[0], eos]]
    n = len(stream) // (seq_len + 1)
    return np.array(stream[: n * (seq_len + 1)]).reshape(n, seq_len + 1)


def test_text_batches_pack_a_jsonl_file(tokenizer, tmp_path):
    docs = make_documents(20, seed=3)
    path = write_jsonl(tmp_path / "eval.jsonl", docs)
    batches = list(text_batches(str(path), tokenizer, seq_len=16, batch_size=5))
    expected = expected_samples(tokenizer, docs, 16)
    assert [b.shape[0] for b in batches[:-1]] == [5] * (len(batches) - 1) and 0 < batches[-1].shape[0] <= 5
    assert np.array_equal(torch.cat(batches).numpy(), expected) and batches[0].dtype == torch.int64


def test_text_batches_read_every_txt_file_of_a_glob(tokenizer, tmp_path):
    docs = make_documents(2, seed=4)
    for i, d in enumerate(docs):
        (tmp_path / f"part{i}.txt").write_text(d)
    got = torch.cat(list(text_batches(str(tmp_path / "*.txt"), tokenizer, seq_len=8, batch_size=4)))
    assert np.array_equal(got.numpy(), expected_samples(tokenizer, docs, 8))


def test_text_batches_split_a_txt_file_at_a_separator_as_prepare_does(tokenizer, tmp_path):
    docs = make_documents(3, seed=5)
    (tmp_path / "stories.txt").write_text("".join(f"{d}\n<|endoftext|>\n" for d in docs))
    got = torch.cat(list(text_batches(str(tmp_path / "stories.txt"), tokenizer, seq_len=8, batch_size=4,
                                      separator="<|endoftext|>")))
    assert np.array_equal(got.numpy(), expected_samples(tokenizer, docs, 8))
    for name in ("eval.jsonl", "notes.txt.jsonl"):  # as a data source's separator, refused where it splits nothing
        path = write_jsonl(tmp_path / name, docs)
        with pytest.raises(ValueError, match=f"--separator splits .txt files into documents, and {path} holds none"):
            text_batches(str(path), tokenizer, seq_len=8, batch_size=4, separator="<|endoftext|>")


def test_a_file_too_short_for_one_sample_is_an_error_naming_it(tokenizer, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("select")
    with pytest.raises(ValueError, match=f"{path}: only .* tokens .*seq_len \\+ 1 = 33"):
        list(text_batches(str(path), tokenizer, seq_len=32, batch_size=2))


def test_a_bad_record_is_an_error_naming_it(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "a row"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(ValueError, match=f"{path}:2: bad record"):
        list(text_batches(str(path), tokenizer, seq_len=4, batch_size=2))


def test_a_missing_file_fails_at_once(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        text_batches(str(tmp_path / "nothing*.txt"), tokenizer, seq_len=4, batch_size=2)

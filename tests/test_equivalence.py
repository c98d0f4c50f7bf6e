"""Equivalence on the Ray-free gloo path: ZeRO stages agree, accumulation equals more ranks,
a preempted and resumed run equals the uninterrupted one bitwise, non-finite steps change nothing,
a compiled run follows the eager one, torchrun runs the same loop."""

import json
import os
import shutil

import pytest
import torch

from cluster.config import compose_config
from corpus import make_documents, write_jsonl
from distributed import RankFailed, run_ranks
from test_train_loop import SMALL_MODEL
from trainer.summary import read_summary
from trainer.train_loop import check_start, train

pytestmark = pytest.mark.integration


def cfg_for(tiny_dataset, run_dir, *overrides, workers=2):
    return compose_config(
        [*SMALL_MODEL, f"data.dir={tiny_dataset}", f"run.dir={run_dir}", "run.name=eq", "logger=none",
         "train.max_steps=5", "train.warmup_steps=2", "train.micro_batch_size=4", "train.loader_workers=0",
         f"cluster.num_workers={workers}", "cluster.launcher=local", *overrides]
    )


def losses(cfg, world):
    return run_ranks(world, train, cfg)[0]["losses"]


@pytest.fixture(scope="module")
def zero2_losses(tiny_dataset, tmp_path_factory):
    return losses(cfg_for(tiny_dataset, tmp_path_factory.mktemp("z2"), "deepspeed=zero2"), 2)


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_zero_stages_give_the_same_losses(tiny_dataset, tmp_path, zero2_losses, stage):
    got = losses(cfg_for(tiny_dataset, tmp_path, f"deepspeed=zero{stage}"), 2)
    # Stages reduce gradients in different orders; fp32 losses agree to about one unit in the last place.
    assert got == pytest.approx(zero2_losses, rel=1e-6)
    assert got != losses(cfg_for(tiny_dataset, tmp_path / "lr", f"deepspeed=zero{stage}", "train.lr=1e-3"), 2)


def test_zero0_logs_the_gradient_norm_deepspeed_logs(tiny_dataset, tmp_path):
    # ZeRO-0 (fp32) computes the norm in the loop; torch's one-pass fp32 norm had been 2e-5 off DeepSpeed's.
    def norms(stage):
        run_ranks(1, train, cfg_for(tiny_dataset, tmp_path / stage, f"deepspeed={stage}", "train.max_steps=3",
                                    "model.model_dim=256", "model.vocab_size=4096",  # a 1M-value embedding
                                    "train.grad_accum_steps=2", workers=1))
        return [json.loads(line)["grad_norm"] for line in open(tmp_path / stage / "metrics.jsonl")]

    assert norms("zero0") == pytest.approx(norms("zero2"), rel=1e-6)


def test_bf16_at_zero0_follows_bf16_at_zero2(tiny_dataset, tmp_path):
    # Two mixed-precision wrappers; ZeRO-0's made AdamW's state with a step of its own (8e-3 apart by step 4).
    bf16 = ["train.precision=bf16", "train.grad_accum_steps=2"]
    zero0 = losses(cfg_for(tiny_dataset, tmp_path / "z0", "deepspeed=zero0", *bf16, workers=1), 1)
    assert zero0 == pytest.approx(losses(cfg_for(tiny_dataset, tmp_path / "z2", "deepspeed=zero2", *bf16, workers=1), 1),
                                  rel=1e-5)


def test_one_rank_with_accumulation_matches_two_ranks(tiny_dataset, tmp_path, zero2_losses):
    cfg = cfg_for(tiny_dataset, tmp_path, "deepspeed=zero2", "train.grad_accum_steps=2", workers=1)
    assert losses(cfg, 1) == pytest.approx(zero2_losses, rel=1e-6)


def test_preempted_and_resumed_run_equals_the_uninterrupted_one_bitwise(tiny_dataset, tmp_path):
    overrides = ("deepspeed=zero3", "train.max_steps=8", "train.checkpoint_every=3")
    full = losses(cfg_for(tiny_dataset, tmp_path / "full", *overrides), 2)

    run_dir = tmp_path / "preempted"
    first = run_ranks(2, train, cfg_for(tiny_dataset, run_dir, *overrides, "train.faults.sigterm_at_step=5"))[0]
    assert first["stopped_by"] == "SIGTERM" and first["steps"] == 5 and first["checkpoint"].endswith("step_5")
    second = run_ranks(2, train, cfg_for(tiny_dataset, run_dir, *overrides))[0]
    assert second["resumed_from"] == "step_5"
    assert first["losses"] + second["losses"] == full  # bitwise
    steps = [json.loads(line)["step"] for line in open(run_dir / "metrics.jsonl")]
    assert steps == list(range(1, 9))


@pytest.mark.parametrize("stage, saved_world, world", [(2, 2, 1), (3, 1, 2), (0, 2, 1)])
def test_a_run_continues_on_another_number_of_ranks(tiny_dataset, tmp_path, zero2_losses, stage, saved_world, world):
    # The same samples per step either way: 2 ranks, or 1 accumulating 2 micro-batches.
    def cfg(ranks, *overrides):
        return cfg_for(tiny_dataset, tmp_path, f"deepspeed=zero{stage}", f"train.grad_accum_steps={2 // ranks}",
                       *overrides, workers=ranks)

    first = run_ranks(saved_world, train, cfg(saved_world, "train.faults.sigterm_at_step=2"))[0]
    second = run_ranks(world, train, cfg(world))[0]
    assert second["resumed_from"] == "step_2"
    assert first["losses"] + second["losses"] == pytest.approx(zero2_losses, rel=1e-6)
    # ZeRO 1-3 partitions go through DeepSpeed's universal form; ZeRO-0's one copy loads as it is.
    assert (tmp_path / "checkpoints" / "step_2" / "universal" / "COMPLETE").is_file() == (stage > 0)


def test_a_run_past_an_epoch_end_continues_on_another_number_of_ranks(tmp_path_factory, tmp_path):
    from corpus import TOKENIZER_CFG, data_cfg
    from data_pipelines.prepare import prepare
    from trainer.checkpoint import read_client_state

    root = tmp_path_factory.mktemp("small")
    small = prepare(data_cfg(write_jsonl(root / "corpus.jsonl", make_documents(10)), root / "dataset"), TOKENIZER_CFG)

    def cfg(ranks, *overrides):
        return cfg_for(small, tmp_path, "deepspeed=zero2", f"train.grad_accum_steps={2 // ranks}", "train.max_steps=12",
                       *overrides, workers=ranks)

    run_ranks(1, train, cfg(1, "train.faults.sigterm_at_step=10"))
    # 10 steps of 8 samples: one sample into the second epoch of 79, which 2 ranks cannot share evenly.
    assert read_client_state(tmp_path / "checkpoints" / "step_10")["loader"] == {"epoch": 1, "position": 1,
                                                                                 "world_size": 1}
    second = run_ranks(2, train, cfg(2))[0]
    assert second["resumed_from"] == "step_10" and len(second["losses"]) == 2


def test_resuming_with_another_global_batch_or_model_is_refused_before_anything_loads(tiny_dataset, tmp_path):
    overrides = ("deepspeed=zero2", "train.max_steps=2")
    run_ranks(2, train, cfg_for(tiny_dataset, tmp_path, *overrides))
    checkpoint = tmp_path / "checkpoints" / "step_2"
    files = {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()}
    # DeepSpeed's own refusals (a state dict of another shape) are tracebacks; these name the
    # checkpoint and what to do instead.
    batch = r"step_2 was trained with 8 samples per step \(2 ranks x 4 x 1 accumulated\), this run has 4 \(1 x 4 x 1\)"
    one_rank = cfg_for(tiny_dataset, tmp_path, *overrides, "train.max_steps=4", workers=1)
    with pytest.raises(RankFailed, match=batch + ": set train.grad_accum_steps=2"):
        run_ranks(1, train, one_rank)
    with pytest.raises(ValueError, match=batch):  # what `elmforge train` checks before starting Ray
        check_start(one_rank)
    with pytest.raises(ValueError, match=batch + ": set train.global_batch_tokens=256$"):  # the batch set in tokens
        check_start(cfg_for(tiny_dataset, tmp_path, *overrides, "train.max_steps=4", "train.global_batch_tokens=128",
                            workers=1))
    with pytest.raises(RankFailed, match=r"step_2 was trained with another model config \(layers 2 \(this run: 3\)\); use a new run.name"):
        run_ranks(2, train, cfg_for(tiny_dataset, tmp_path, *overrides, "train.max_steps=4", "model.num_layers=3"))
    with pytest.raises(ValueError, match="step_2 was saved under ZeRO-2, this run uses ZeRO-3: keep deepspeed=zero2"):
        check_start(cfg_for(tiny_dataset, tmp_path, *overrides, "deepspeed=zero3"))
    for key, saved, ours in (("precision", "fp32", "bf16"), ("seed", 0, 1)):
        with pytest.raises(ValueError, match=f"saved with train.{key}={saved}, this run has {ours}: keep train.{key}={saved} "):
            check_start(cfg_for(tiny_dataset, tmp_path, *overrides, f"train.{key}={ours}"))
    assert {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()} == files  # nothing lost
    # A checkpoint that cannot be converted for another world size (a rank's partition lost) fails every rank.
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "checkpoints", broken / "checkpoints")
    (broken / "checkpoints" / "step_2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    # A TrainingError, so Ray does not retry it: the message names the fix. The file list its COMPLETE
    # marker records finds it first; a checkpoint without one (saved before markers had it) fails converting.
    resume_on_one = cfg_for(tiny_dataset, broken, *overrides, "train.max_steps=4", "train.grad_accum_steps=2", workers=1)
    with pytest.raises(RankFailed, match=r"TrainingError: checkpoint .*step_2 cannot be read \(zero_pp_rank_1_mp_rank_00"
                                         r"_optim_states.pt is missing\); to resume from the one before it, remove "):
        run_ranks(1, train, resume_on_one)
    (broken / "checkpoints" / "step_2" / "COMPLETE").write_text('{"step": 2}\n')
    with pytest.raises(RankFailed, match=r"TrainingError: converting .*step_2 for another world size failed: no optimizer "
                                         r"partition of rank\(s\) \[1\] .*; to resume from the checkpoint before it, remove "):
        run_ranks(1, train, resume_on_one)
    assert not (broken / "checkpoints" / "step_2" / "universal").exists()
    resumed = run_ranks(2, train, cfg_for(tiny_dataset, tmp_path, *overrides, "train.max_steps=3"))[0]
    assert resumed["resumed_from"] == "step_2"


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_to_resume_from(tiny_dataset, tmp_path):
    overrides = ("train.max_steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=2")
    full = losses(cfg_for(tiny_dataset, tmp_path / "full", *overrides, workers=1), 1)
    run_dir = tmp_path / "crashed"
    # The process dies once DeepSpeed has written step_4's files, before the checkpoint is marked complete.
    with pytest.raises(RankFailed, match="died"):
        run_ranks(1, train, cfg_for(tiny_dataset, run_dir, *overrides, "train.faults.kill_in_save_at_step=4",
                                    workers=1))
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "step_4" / "mp_rank_00_model_states.pt").is_file() and not (ckpts / "step_4" / "COMPLETE").exists()
    assert (ckpts / "latest").read_text() == "step_2"  # DeepSpeed's pointer (zero_to_fp32.py's) names a complete one
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 3.')  # a metrics line a full disk cut short: left out, not an error
    # Resumed with activation checkpointing on (as one would to fit memory): the same run, the same math.
    second = run_ranks(1, train, cfg_for(tiny_dataset, run_dir, *overrides, "model.activation_checkpointing=true",
                                         workers=1))[0]
    assert second["resumed_from"] == "step_2"
    assert [json.loads(line)["loss"] for line in open(run_dir / "metrics.jsonl")] == full  # bitwise
    # The newest 2 complete checkpoints are kept; step_4 was written again over the crashed save's files.
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_4", "step_6"]
    assert (ckpts / "step_4" / "COMPLETE").is_file() and (ckpts / "latest").read_text() == "step_6"


def _weights_and_optimizer(step_dir):
    module = torch.load(next(step_dir.glob("*model_states.pt")), weights_only=False)["module"]
    optim = [torch.load(p, weights_only=False)["optimizer_state_dict"] for p in sorted(step_dir.glob("*optim_states.pt"))]
    return module, optim


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            if k not in ("step",):
                _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)


@pytest.mark.parametrize("stage, world, precision", [(2, 2, "fp32"), (0, 1, "fp32"), (0, 1, "bf16")])
def test_a_non_finite_step_changes_nothing_on_any_rank(tiny_dataset, tmp_path, stage, world, precision):
    cfg = cfg_for(tiny_dataset, tmp_path, f"deepspeed=zero{stage}", f"train.precision={precision}",
                  "train.checkpoint_every=1",
                  "train.keep_checkpoints=10", "train.faults.nonfinite_at_steps=[3]",
                  f"train.faults.nonfinite_rank={world - 1}", workers=world)
    summary = run_ranks(world, train, cfg)[0]
    assert summary["skipped_steps"] == 1
    ckpts = tmp_path / "checkpoints"
    before, after = _weights_and_optimizer(ckpts / "step_2"), _weights_and_optimizer(ckpts / "step_3")
    _assert_same(before, after)
    later = _weights_and_optimizer(ckpts / "step_4")
    assert not torch.equal(next(iter(later[0].values())), next(iter(after[0].values())))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["skipped"] for r in records] == [0, 0, 1, 0, 0]


def test_too_many_non_finite_steps_in_a_row_stop_with_a_clear_error(tiny_dataset, tmp_path):
    cfg = cfg_for(tiny_dataset, tmp_path, "train.checkpoint_every=1", "train.faults.nonfinite_at_steps=[2,3,4]",
                  "train.max_skipped_in_row=3")
    with pytest.raises(RankFailed, match=r"training stopped at step 4: 3 steps in a row .* last good checkpoint is step_3"):
        run_ranks(2, train, cfg)


def test_a_resumed_run_counts_the_non_finite_steps_before_the_stop(tiny_dataset, tmp_path):
    overrides = ("train.checkpoint_every=1", "train.faults.nonfinite_at_steps=[3,4,5]", "train.max_skipped_in_row=3")
    first = run_ranks(1, train, cfg_for(tiny_dataset, tmp_path, *overrides, "train.faults.sigterm_at_step=4",
                                        workers=1))[0]
    assert first["stopped_by"] == "SIGTERM" and first["skipped_steps"] == 2
    with pytest.raises(RankFailed, match=r"training stopped at step 5: 3 steps in a row .*; the newest checkpoint is "
                                           r"step_4, the one this run resumed from in "):
        run_ranks(1, train, cfg_for(tiny_dataset, tmp_path, *overrides, workers=1))
    # The stop's summary went when training resumed: it no longer describes the run.
    assert not (tmp_path / "summary.json").exists()


def _train_counting_graphs(cfg) -> dict:
    from torch._dynamo.utils import counters

    return {**train(cfg), "compiled_graphs": counters["stats"]["unique_graphs"]}


def test_a_compiled_run_matches_the_eager_one_and_resumes_eagerly(tiny_dataset, tmp_path):
    eager = losses(cfg_for(tiny_dataset, tmp_path / "eager", workers=1), 1)
    run_dir = tmp_path / "compiled"
    first = run_ranks(1, _train_counting_graphs, cfg_for(tiny_dataset, run_dir, "train.compile=true", "train.faults.sigterm_at_step=3",
                                        workers=1))[0]
    # Inductor fuses and reorders fp32 arithmetic: close to the eager losses, not bitwise.
    assert first["compiled_graphs"] >= 2  # the model and the loss
    assert first["steps"] == 3 and first["losses"] == pytest.approx(eager[:3], rel=1e-4)
    # The compiled run's checkpoint keeps the plain module's parameter names: an eager run resumes it.
    second = run_ranks(1, _train_counting_graphs, cfg_for(tiny_dataset, run_dir, workers=1))[0]
    assert second["compiled_graphs"] == 0
    assert second["resumed_from"] == "step_3" and second["losses"] == pytest.approx(eager[3:], rel=1e-4)


def test_torchrun_runs_the_same_loop_and_ctrl_c_stops_it_for_a_resume(tmp_path):
    import signal
    import subprocess
    import sys

    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_documents(300, seed=11))
    overrides = [*SMALL_MODEL, f"storage_path={tmp_path}", f"data.sources=[{{name:gen,path:{corpus}}}]",
                 "data.workers=0", "logger=none", "train.max_steps=30", "train.warmup_steps=2",
                 "train.micro_batch_size=4", "train.loader_workers=0", "train.log_every=1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "cluster.cli", "train", *overrides, "run.name=torchrun"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    # Ctrl-C in a terminal reaches torchrun (its workers run in their own session), which passes it on.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "[train] step 2/30" in line:
            proc.send_signal(signal.SIGINT)
            break
    out = "".join(seen) + proc.communicate(timeout=300)[0]
    assert "2 ranks, ZeRO-2" in out and "training stopped on request (SIGINT;" in out, out[-3000:]
    stopped = read_summary(tmp_path / "outputs/torchrun")
    assert stopped["stopped_by"] == "SIGINT" and 2 <= stopped["steps"] < 30
    recorded = json.loads((tmp_path / "outputs/torchrun/run_config.json").read_text())["cluster"]
    assert recorded["launcher"] == "local" and recorded["num_workers"] == 2  # as torchrun launched it

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"resuming from step_{stopped['steps']}" in resumed.stdout
    assert resumed.stdout.count("training finished") == 1
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "outputs/torchrun/metrics.jsonl")]
    cfg = compose_config([*overrides, "run.name=spawned", "cluster.num_workers=2"])
    assert run_ranks(2, train, cfg)[0]["losses"] == losses

    # Finished, with its input files changed since: it needs no data, so each rank answers from the
    # checkpoint (as the Ray path does) and rank 0 prints, rather than refusing the changed data.
    corpus.write_bytes(corpus.read_bytes() + b'{"text": "a document added since"}\n')
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert again.stdout.count("already finished at step 30") == 1 and again.stdout.count("training finished") == 1

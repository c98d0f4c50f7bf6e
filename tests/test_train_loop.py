"""The Ray-free training loop in this process (a world of one, gloo, DeepSpeed on CPU)."""

import hashlib
import json
import math
import re
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from cluster.config import compose_config
from trainer.checkpoint import complete_checkpoints
from trainer.distributed import init_distributed
from trainer.model import OpenELMConfig, build_model
from trainer.summary import read_summary
from trainer.train_loop import build_engine, train
from wandb_offline import run_history, run_summary, run_system_metrics

SMALL_MODEL = [
    "model.num_layers=2",
    "model.model_dim=64",
    "model.head_dim=16",
    "model.ffn_dim_divisor=16",
    "tokenizer.vocab_size=300",
    "data.seq_len=32",
]


def small_cfg(tiny_dataset, tmp_path, *extra):
    return compose_config(
        [*SMALL_MODEL, f"data.dir={tiny_dataset}", f"storage_path={tmp_path}", "train.max_steps=6",
         "train.warmup_steps=2", "train.micro_batch_size=4", "train.log_every=2", *extra]
    )


def test_train_writes_metrics_checkpoint_and_an_offline_wandb_run(tiny_dataset, tmp_path, capsys):
    cfg = small_cfg(tiny_dataset, tmp_path, "train.grad_accum_steps=2")
    result = train(cfg)
    assert len(result["losses"]) == 6 and all(math.isfinite(x) for x in result["losses"])
    out = capsys.readouterr().out
    assert "[train] step 6/6" in out
    assert f"[wandb] offline run {result['wandb_dir']} (upload: wandb sync {result['wandb_dir']})" in out

    records = [json.loads(line) for line in open(result["metrics"])]
    assert [r["step"] for r in records] == list(range(1, 7))
    for key in ("loss", "ce_loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "tokens", "mfu", "memory_gb"):
        assert all(math.isfinite(r[key]) for r in records), key
    assert records[0]["lr"] == pytest.approx(1e-6)
    assert records[-1]["tokens"] == 6 * 4 * 2 * 32
    assert all(0 < r["mfu"] < 1 and r["memory_gb"] > 0.1 for r in records)
    assert [r["loss"] for r in records] == result["losses"]

    ckpts = complete_checkpoints(f"{cfg['run']['dir']}/checkpoints")
    assert [c.name for c in ckpts] == ["step_6"]
    assert any(ckpts[0].glob("*model_states.pt")) and any(ckpts[0].glob("*optim_states.pt"))
    assert read_summary(cfg["run"]["dir"])["checkpoint"] == str(ckpts[0])

    wb = run_summary(result["wandb_dir"])
    assert wb["state"] == "finished" and wb["name"] == cfg["run"]["name"]
    assert wb["config"]["model"]["num_layers"] == 2 and wb["config"]["deepspeed"]["stage"] == 2
    assert wb["summary"]["loss"] == pytest.approx(records[-1]["loss"])
    history = run_history(result["wandb_dir"])
    assert [h["_step"] for h in history] == list(range(1, 7))
    assert [h["loss"] for h in history] == pytest.approx([r["loss"] for r in records])
    assert [h["grad_norm"] for h in history] == pytest.approx([r["grad_norm"] for r in records])
    system = run_system_metrics(result["wandb_dir"])  # W&B's system metrics are on
    assert system and all("memory_percent" in sample for sample in system)


def test_a_resumed_offline_run_prints_one_sync_command_for_all_its_wandb_directories(tiny_dataset, tmp_path, capsys):
    from cluster.commands import _print_summary

    first = train(small_cfg(tiny_dataset, tmp_path, "run.name=twice", "train.max_steps=2", "train.warmup_steps=1"))
    cfg = small_cfg(tiny_dataset, tmp_path, "run.name=twice", "train.max_steps=4", "train.warmup_steps=1")
    capsys.readouterr()
    second = train(cfg)
    assert second["resumed_from"] == "step_2" and second["wandb_dir"] != first["wandb_dir"]
    both = f"wandb sync {first['wandb_dir']} {second['wandb_dir']}"
    assert f"[wandb] offline run {second['wandb_dir']} (upload: {both})" in capsys.readouterr().out  # at its start
    _print_summary(cfg, second)
    assert f"upload with  wandb sync {first['wandb_dir']} {second['wandb_dir']}\n" in capsys.readouterr().out
    assert [h["_step"] for h in run_history(first["wandb_dir"]) + run_history(second["wandb_dir"])] == [1, 2, 3, 4]
    ids = {f.name for run in (first, second) for f in Path(run["wandb_dir"]).glob("run-*.wandb")}
    assert ids == {f"run-twice-{hashlib.sha256(cfg['run']['dir'].encode()).hexdigest()[:8]}.wandb"}, ids


def test_one_run_name_under_two_storage_paths_is_two_wandb_runs(tmp_path):
    from trainer.metrics import wandb_run_id

    mine, theirs = wandb_run_id("demo", str(tmp_path / "a/outputs/demo")), wandb_run_id("demo", str(tmp_path / "b/outputs/demo"))
    assert mine != theirs and mine.startswith("demo-") and theirs.startswith("demo-")
    assert wandb_run_id("demo", str(tmp_path / "a/outputs/demo")) == mine  # every invocation of the run: one id
    odd = wandb_run_id("lr=3e-4 / seed 1" + "x" * 200, str(tmp_path))
    assert len(odd) <= 128 and re.fullmatch(r"lr-3e-4---seed-1x+-[0-9a-f]{8}", odd), odd


def test_logger_none_writes_metrics_but_no_wandb_run(tiny_dataset, tmp_path):
    cfg = small_cfg(tiny_dataset, tmp_path, "logger=none", "train.max_steps=2", "train.warmup_steps=1")
    result = train(cfg)
    assert result["wandb_dir"] is None and not (tmp_path / "outputs" / cfg["run"]["name"] / "wandb").exists()
    assert len(open(result["metrics"]).readlines()) == 2


@pytest.fixture
def online_wandb(tiny_dataset, tmp_path, monkeypatch):
    """An online run's config, with W&B's process-wide state set up from this test's environment and torn
    down after it: W&B reads its environment once per process."""
    import wandb

    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login either
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "10")
    wandb.teardown()
    yield small_cfg(tiny_dataset, tmp_path, "logger.mode=online", "train.max_steps=1", "train.warmup_steps=1")
    wandb.teardown()


def _refusal(cfg) -> str:
    from trainer.errors import TrainingError

    with pytest.raises(TrainingError) as raised:
        train(cfg)
    return str(raised.value)


INSTEAD = "or set logger.mode=offline (upload later with wandb sync) or logger=none"
LOG_IN = f"log in (`wandb login`, or WANDB_API_KEY in the environment), {INSTEAD}"


def test_an_online_wandb_run_without_a_key_is_one_line_naming_the_ways_out(online_wandb):
    said = _refusal(online_wandb)
    assert said.startswith("W&B (logger.mode=online): ") and said.endswith(LOG_IN)


def test_an_online_wandb_run_whose_server_does_not_answer_says_so_not_log_in(online_wandb, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_API_KEY", "b" * 40)  # a key is given: logging in again would not help
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:1")  # nothing listens there
    said = _refusal(online_wandb)
    assert "(Post \"http://127.0.0.1:1/graphql\"" in said and "log in" not in said
    assert said.endswith(f"no answer from the W&B server: check this node's network (and WANDB_BASE_URL), {INSTEAD}")
    assert "[wandb] connecting to the W&B server" in capsys.readouterr().out  # before the wait, not after


@pytest.mark.parametrize("status, fix", [(401, LOG_IN), (404, f"the W&B server answered HTTP 404: check WANDB_BASE_URL, {INSTEAD}")])
def test_an_online_wandb_run_refused_by_its_server_names_the_answer(online_wandb, monkeypatch, status, fix):
    import http.server
    import threading

    class Refuses(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuses)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("WANDB_API_KEY", "b" * 40)  # a revoked key (401), or a wrong WANDB_BASE_URL (404)
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_port}")
        said = _refusal(online_wandb)
    finally:
        server.shutdown()
    assert said.endswith(fix) and "no answer" not in said


def test_the_deprecated_collectives_deepspeed_calls_every_step_do_not_warn():
    import warnings

    import torch.distributed as dist

    init_distributed(use_gpu=False)
    with warnings.catch_warnings(record=True) as seen:  # the filters init_distributed set stay in force
        dist.all_gather_into_tensor(torch.zeros(dist.get_world_size() * 2), torch.ones(2))  # ZeRO-1/2
        dist.reduce_scatter_tensor(torch.zeros(2), torch.ones(dist.get_world_size() * 2))  # ZeRO-3, each step
    assert not [str(w.message) for w in seen if issubclass(w.category, FutureWarning)]


def test_engine_carries_the_recipe_optimizer(tiny_dataset, tmp_path):
    cfg = small_cfg(tiny_dataset, tmp_path)
    env = init_distributed(use_gpu=False)
    model = build_model(OpenELMConfig(**cfg["model"]), seed=0)
    engine, scheduler = build_engine(cfg, model, env)
    assert type(engine.basic_optimizer) is torch.optim.AdamW and engine.basic_optimizer.defaults["fused"]
    groups = engine.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(tuple(g["betas"]) == (0.9, 0.95) and g["eps"] == 1e-8 for g in groups)
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-6)
    assert engine.gradient_clipping() == 1.0
    assert engine.zero_optimization_stage() == 2


def test_bf16_trains(tiny_dataset, tmp_path):
    cfg = small_cfg(tiny_dataset, tmp_path, "train.precision=bf16", "logger=none", "train.max_steps=3",
                    "train.warmup_steps=1")
    losses = train(cfg)["losses"]
    assert all(math.isfinite(x) for x in losses)


def test_vocabulary_larger_than_the_model_is_refused(tiny_dataset, tmp_path):
    cfg = small_cfg(tiny_dataset, tmp_path, "logger=none")
    cfg["model"]["vocab_size"] = 200
    with pytest.raises(ValueError, match="tokenizer vocabulary 300 exceeds model.vocab_size=200"):
        train(cfg)


@pytest.mark.parametrize("zero", ["zero2_offload", "zero3_offload"])
def test_cpu_offload_variants_train(tiny_dataset, tmp_path, zero):
    cfg = small_cfg(tiny_dataset, tmp_path, f"deepspeed={zero}", "logger=none", "train.max_steps=3",
                    "train.warmup_steps=1")
    losses = train(cfg)["losses"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


def test_a_run_resumed_after_its_last_step_reports_its_final_validation(tiny_dataset, tmp_path):
    # A sweep trial that finished while the sweep was interrupted is restarted on resume: Tune
    # still needs its metric.
    cfg = small_cfg(tiny_dataset, tmp_path, "logger=none", "train.eval_every=3", "train.eval_batches=1")
    first = []
    train(cfg, report=first.append)
    again = []
    train(cfg, report=again.append)
    assert [r["step"] for r in first] == [3, 6]
    assert again == [{"step": 6, "loss": first[-1]["loss"], "val_loss": first[-1]["val_loss"]}]

    # The process ended after its last checkpoint, before summary.json; or the file is the one an
    # earlier stop left: the summary is written anew from the checkpoint and metrics.jsonl.
    run_dir = Path(cfg["run"]["dir"])
    written = read_summary(run_dir)
    for stale in (None, {**written, "steps": 3, "stopped_by": "SIGTERM"}):
        (run_dir / "summary.json").unlink()
        if stale:
            (run_dir / "summary.json").write_text(json.dumps(stale))
        rebuilt = train(cfg)
        assert read_summary(run_dir) == rebuilt
        assert (rebuilt["steps"], rebuilt["stopped_by"], rebuilt["checkpoint"]) == (6, None, written["checkpoint"])
        assert (rebuilt["final_loss"], rebuilt["final_val_loss"]) == (written["final_loss"], written["final_val_loss"])
        assert rebuilt["num_params"] == written["num_params"]


def test_a_stopped_run_reports_its_newest_validation_and_when_it_was(tiny_dataset, tmp_path):
    base = ["logger=none", "train.max_steps=8", "train.eval_every=4", "train.eval_batches=1"]
    val_at = {}
    for stop_at in (5, 6, None):  # stopped after this invocation's validation, stopped before any, finished
        fault = [f"train.faults.sigterm_at_step={stop_at}"] if stop_at else []
        summary = train(small_cfg(tiny_dataset, tmp_path, *base, *fault))
        records = [json.loads(line) for line in open(summary["metrics"])]
        val_at.update({r["step"]: r["val_loss"] for r in records if "val_loss" in r})
        newest = max(val_at)
        assert (summary["steps"], summary["final_val_step"]) == (stop_at or 8, newest)
        assert summary["final_val_loss"] == val_at[newest] and read_summary(Path(summary["metrics"]).parent) == summary
    assert sorted(val_at) == [4, 8]


def test_a_run_begun_again_from_scratch_keeps_nothing_that_passes_for_its_state(tiny_dataset, tmp_path):
    from trainer.train_loop import NonFiniteTraining

    cfg = small_cfg(tiny_dataset, tmp_path, "logger=none", "run.name=again")
    train(cfg)
    run_dir = Path(cfg["run"]["dir"])
    for checkpoint in complete_checkpoints(run_dir / "checkpoints"):  # deleted by hand: the run starts over
        shutil.rmtree(checkpoint)
    diverging = small_cfg(tiny_dataset, tmp_path, "logger=none", "run.name=again", "train.faults.nonfinite_at_steps=[2]",
                          "train.max_skipped_in_row=1")
    with pytest.raises(NonFiniteTraining):
        train(diverging)
    # Not the first run's summary (finished, 6 steps), nor DeepSpeed's pointer to its deleted last checkpoint.
    assert not (run_dir / "summary.json").exists() and not (run_dir / "checkpoints/latest").exists()
    assert [json.loads(line)["step"] for line in open(run_dir / "metrics.jsonl")] == [1, 2]


def test_a_run_that_fails_is_a_failed_wandb_run_with_its_totals(tiny_dataset, tmp_path):
    from trainer.train_loop import NonFiniteTraining

    cfg = small_cfg(tiny_dataset, tmp_path, "run.name=diverges", "train.faults.nonfinite_at_steps=[3,4]",
                    "train.max_skipped_in_row=2", "train.eval_every=2", "train.eval_batches=1")
    with pytest.raises(NonFiniteTraining):
        train(cfg)
    records = [json.loads(line) for line in open(Path(cfg["run"]["dir"]) / "metrics.jsonl")]
    wb = run_summary(next(Path(cfg["run"]["dir"], "wandb").glob("offline-run-*")))
    assert wb["state"] == "failed", wb  # not "finished", as a run that trained to its end
    newest_val = [r for r in records if "val_loss" in r][-1]
    assert wb["summary"]["skipped_steps"] == 2
    assert (wb["summary"]["final_val_step"], wb["summary"]["final_val_loss"]) == (newest_val["step"], newest_val["val_loss"])


def test_a_damaged_shard_stops_the_run_with_its_name_and_its_loader_worker(tiny_dataset, tmp_path):
    import multiprocessing

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    for shard in (data / "train").glob("*.tar"):
        with tarfile.open(shard) as tar:
            samples = [m.offset_data for m in tar.getmembers()]
        raw = bytearray(shard.read_bytes())
        for at in samples:
            raw[at + 1] ^= 0x20  # each sample's .npy magic: same size, other bytes
        shard.write_bytes(bytes(raw))
    cfg = small_cfg(data, tmp_path, "logger=none", "train.loader_workers=1")
    with pytest.raises(ValueError, match=r"^shard .*shard-\d+.tar: sample \d+ is not a token array .*: the shard is "
                                         r"damaged"):
        train(cfg)
    assert multiprocessing.active_children() == []  # else the process would hang at exit (test_loader.py)


def test_a_run_extended_on_purpose_follows_its_new_schedule_from_the_first_resumed_step(tiny_dataset, tmp_path):
    from trainer.optim import warmup_cosine_lr

    cfg = small_cfg(tiny_dataset, tmp_path, "logger=none", "run.name=extended")
    train(cfg)
    longer = small_cfg(tiny_dataset, tmp_path, "logger=none", "run.name=extended", "train.max_steps=10")
    assert train(longer)["resumed_from"] == "step_6"
    t = longer["train"]
    lrs = [json.loads(line)["lr"] for line in open(Path(cfg["run"]["dir"], "metrics.jsonl"))]
    # Step s (1-based) runs at the schedule's lr for optimizer step s - 1; from step 7 on, the 10-step one.
    expected = [warmup_cosine_lr(s - 1, t["lr"], t["warmup_init_lr"], t["warmup_steps"], m, t["min_lr_ratio"])
                for s, m in [(s, 6) for s in range(1, 7)] + [(s, 10) for s in range(7, 11)]]
    assert lrs == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("zero", ["zero0", "zero2"])
def test_a_run_resumed_with_other_adamw_settings_on_purpose_trains_with_them(tiny_dataset, tmp_path, monkeypatch, zero):
    import trainer.train_loop as loop

    seen = []
    step = loop._train_step

    def recording(engine, *args, **kwargs):  # the optimizer's groups as each step starts
        seen.append([(g["betas"], g["eps"], g["weight_decay"]) for g in engine.optimizer.param_groups])
        return step(engine, *args, **kwargs)

    monkeypatch.setattr(loop, "_train_step", recording)
    base = ("logger=none", "run.name=retuned", f"deepspeed={zero}")
    train(small_cfg(tiny_dataset, tmp_path, *base, "train.max_steps=2"))
    assert seen[-1] == [((0.9, 0.95), 1e-8, 0.1), ((0.9, 0.95), 1e-8, 0.0)]  # the recipe's; norms never decay
    changed = ("train.max_steps=4", "train.betas=[0.5,0.6]", "train.eps=0.001", "train.weight_decay=0.02")
    assert train(small_cfg(tiny_dataset, tmp_path, *base, *changed))["resumed_from"] == "step_2"
    assert seen[2] == [((0.5, 0.6), 0.001, 0.02), ((0.5, 0.6), 0.001, 0.0)]


@pytest.mark.parametrize("damaged_file", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_a_damaged_checkpoint_names_itself_and_the_fix_and_loses_nothing(tiny_dataset, tmp_path, damaged_file, damage):
    from trainer.errors import TrainingError

    cfg = small_cfg(tiny_dataset, tmp_path, "logger=none", "run.name=damaged", "train.checkpoint_every=2")
    train(cfg)
    run_dir = Path(cfg["run"]["dir"])
    newest = run_dir / "checkpoints/step_6"
    target = newest / damaged_file
    data = target.read_bytes()
    if damage == "truncated":  # as a full disk or a bad copy leaves it
        target.write_bytes(data[: len(data) // 3])
    else:  # as a failing disk leaves it: the same size, a block of other bytes, which torch's reader takes as data
        target.write_bytes(data[: len(data) // 2] + bytes(4096) + data[len(data) // 2 + 4096 :])
    before = {p: p.read_bytes() for p in (run_dir / "metrics.jsonl", run_dir / "summary.json")}
    longer = small_cfg(tiny_dataset, tmp_path, "logger=none", "run.name=damaged", "train.checkpoint_every=2",
                       "train.max_steps=8")
    change = "has changed since it was saved" if damage == "overwritten" else "bytes, [0-9]+ when saved"
    message = (f"checkpoint {newest} cannot be read \\({damaged_file} .*{change}.*\\); to resume from the one before "
               f"it, remove {newest}/COMPLETE")
    with pytest.raises(TrainingError, match=message):
        train(longer)
    if damaged_file.startswith("mp_rank") and damage == "truncated":  # the CLI's check reads its client state first
        from trainer.train_loop import check_start

        with pytest.raises(TrainingError, match=message):
            check_start(longer)
    assert {p: p.read_bytes() for p in before} == before
    (newest / "COMPLETE").unlink()  # the fix the message names
    assert train(longer)["resumed_from"] == "step_4"


def test_every_validation_shows_in_a_progress_line(tiny_dataset, tmp_path, capsys):
    cfg = small_cfg(tiny_dataset, tmp_path, "logger=none", "train.log_every=5", "train.eval_every=3",
                    "train.eval_batches=1")
    reports = []
    train(cfg, report=reports.append)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[train] step ")]
    # Steps 3 and 6 validate, 5 is a log step, 6 the last.
    assert [line.split()[2] for line in lines] == ["3/6", "5/6", "6/6"]
    assert ["val_loss" in line for line in lines] == [True, False, True]
    # What a sweep may name as its metric (sweep.metric is checked against this list before Ray starts).
    from trainer.train_loop import REPORTED_METRICS

    assert [r["step"] for r in reports] == [3, 6] and all(set(r) == {"step", *REPORTED_METRICS} for r in reports)


def test_python_collects_garbage_only_at_every_nth_step_while_training(tiny_dataset, tmp_path):
    import gc

    during = []  # the collections made while automatic collection was off: the loop's own

    def record(phase, info):
        if phase == "start" and not gc.isenabled():
            during.append(info["generation"])

    cfg = small_cfg(tiny_dataset, tmp_path, "logger=none", "train.max_steps=5", "train.gc_every=2")
    gc.callbacks.append(record)
    try:
        train(cfg)
    finally:
        gc.callbacks.remove(record)
    assert during == [2, 2]  # full collections after steps 2 and 4
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_the_progress_line_leaves_out_mfu_when_no_peak_is_known():
    from trainer.train_loop import _progress_line

    rec = {"loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1000.0}
    line = _progress_line(5, 10, rec, elapsed=5.0, steps_done=5)  # a GPU missing from PEAK_FLOPS: no "mfu"
    assert line == "[train] step 5/10 | loss 2.5000 | lr 1.00e-03 | grad_norm 0.500 | 1,000 tok/s | ETA 5s"
    assert "| MFU 42.0% |" in _progress_line(5, 10, {**rec, "mfu": 0.42}, elapsed=5.0, steps_done=5)


def test_offline_runs_finds_every_invocation_of_a_run_in_start_order(tmp_path):
    from trainer.metrics import offline_runs

    def offline_dir(name: str, run_id: str, size: int = 4096) -> Path:
        d = tmp_path / "wandb" / name
        d.mkdir(parents=True)
        (d / f"run-{run_id}.wandb").write_bytes(b"\0" * size)
        return d

    # W&B adds -N to a directory started within the same second as another of the run;
    # a run named "twice-1" is another run, though its directory name looks alike.
    first = offline_dir("offline-run-20261128_063119-twice", "twice")
    other = offline_dir("offline-run-20261128_063120-twice-1", "twice-1")
    third = offline_dir("offline-run-20261128_063119-twice-2", "twice")
    second = offline_dir("offline-run-20261128_063119-twice-1", "twice")
    fourth = offline_dir("offline-run-20261128_070000-twice", "twice")
    assert offline_runs(third) == [first, second, third, fourth]
    assert offline_runs(other) == [other]
    # An invocation killed before W&B wrote a record: W&B's header alone, nothing to upload (but the
    # invocation asking, just started, is listed).
    killed = offline_dir("offline-run-20261128_080000-twice", "twice", size=7)
    assert offline_runs(fourth) == [first, second, third, fourth]
    assert offline_runs(killed) == [first, second, third, fourth, killed]

"""The training loop: OpenELM + DeepSpeed ZeRO on prepared shards. Imports no Ray.

Runs the same in one process, under torchrun, or inside a Ray Train worker
(cluster/launch.py): every rank calls train(cfg) with the finalised config.
A run resumes from its newest complete checkpoint, so re-running the same
run.name, a restarted worker group and a preempted job all continue exactly.
"""

import json
import math
import socket
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch

from data_pipelines.loader import TokenLoader
from data_pipelines.manifest import MANIFEST_NAME, read_manifest
from data_pipelines.tokenizer import find_tokenizer_file, load_tokenizer
from trainer.checkpoint import (
    check_intact,
    latest_checkpoint,
    load_checkpoint,
    read_client_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from trainer.deepspeed_config import deepspeed_config, deepspeed_guards_updates
from trainer.distributed import DistEnv, from_rank0, init_distributed, mean_across_ranks
from trainer.errors import TrainingError
from trainer.evaluate import all_reduce_sums, evaluate_loss, validation_batches
from trainer.faults import maybe_kill, maybe_poison, maybe_sigterm
from trainer.flops import device_peak_flops, flops_per_token, mfu, non_embedding_params, peak_memory_gb
from trainer.host_memory import keep_freed_memory, release_freed_memory
from trainer.loss import lm_loss
from trainer.metrics import MetricsLogger, complete_lines
from trainer.model import OpenELMConfig, build_model
from trainer.optim import (follow_schedule, keeping_configured_hyperparameters, param_groups, rewind_one_step,
                          warmup_cosine_scheduler)
from trainer.preemption import PreemptionWatch
from trainer.run_data import check_dataset_unchanged
from trainer.reshard import check_same_global_batch, load_universal, needs_universal, universal_checkpoint
from trainer.step_gc import StepCollector
from trainer.summary import SUMMARY_NAME, read_json, write_summary


def model_config(cfg: dict) -> OpenELMConfig:
    """The model: `model=`, laid out layer by layer as train.init_from's config.json when starting
    from a Hugging Face checkpoint (which must hold the same architecture)."""
    composed = OpenELMConfig(**cfg["model"])
    if not cfg["train"]["init_from"]:
        return composed
    from trainer.hf import config_from_hf

    path = Path(cfg["train"]["init_from"], "config.json")
    hf = config_from_hf(json.loads(path.read_text()), source=str(path))
    differences = composed.architecture_differences(hf, f"model={composed.name}", shapes_only=True)
    if differences:
        vocab = ""
        if hf.vocab_size != composed.vocab_size:  # no model= names it: the tokenizer's size (openelm_tiny's follows it)
            vocab = f" (its vocabulary: model.vocab_size={hf.vocab_size}, with data of its tokenizer)"
        raise ValueError(
            f"train.init_from: {path} describes another model than model={composed.name}: "
            f"{'; '.join(differences)}. Pick the model= that matches it{vocab}"
        )
    # The checkpoint's exact layer lists; the run's own name and activation checkpointing.
    return replace(hf, name=composed.name, activation_checkpointing=composed.activation_checkpointing)


def check_init_from(cfg: dict) -> None:
    """What can be refused of train.init_from before any data is prepared: its architecture, and its
    tokenizer against a tokenizer file the data would be prepared with (a run that has a checkpoint
    resumes from it instead)."""
    model_config(cfg)
    init_from, tokenizer = cfg["train"]["init_from"], cfg["tokenizer"]
    if not init_from or tokenizer["kind"] == "bpe" or latest_checkpoint(Path(cfg["run"]["dir"], "checkpoints")):
        return
    theirs = find_tokenizer_file(init_from)
    if theirs is not None:
        _require_tokenizer_of(theirs, load_tokenizer(tokenizer["path"]), f"tokenizer.path={tokenizer['path']}, "
                              "which the data is prepared with")


def _require_tokenizer_of(theirs: Path, data_tokenizer, which: str) -> None:
    """The model's tokenizer file `theirs` has the ids of the data's tokenizer (`which` names it)."""
    model_tokenizer = load_tokenizer(theirs)
    if not model_tokenizer.same_ids_as(data_tokenizer):
        raise ValueError(
            f"train.init_from: the model's tokenizer {theirs} ({model_tokenizer.fingerprint[:12]}) is not "
            f"{which} ({data_tokenizer.fingerprint[:12]}): prepare the data with "
            f"tokenizer={'llama' if theirs.suffix == '.model' else 'file'} tokenizer.path={theirs} "
            f"tokenizer.vocab_size={model_tokenizer.vocab_size} (under another data.name=), or start from a model "
            "of this dataset's tokenizer"
        )


def _check_data(model_cfg: OpenELMConfig, manifest, init_from: str | None) -> None:
    """The dataset suits the model, and a Hugging Face directory to start from that carries a tokenizer
    (ours do; Apple's releases do not) carries the dataset's: its embedding rows are that tokenizer's ids."""
    if manifest.vocab_size > model_cfg.vocab_size:
        raise ValueError(
            f"{manifest.root}: tokenizer vocabulary {manifest.vocab_size} exceeds model.vocab_size={model_cfg.vocab_size}"
        )
    if manifest.seq_len > model_cfg.rope_max_length:
        raise ValueError(f"{manifest.root}: seq_len {manifest.seq_len} exceeds model.rope_max_length")
    theirs = find_tokenizer_file(init_from) if init_from else None
    if theirs is not None:
        _require_tokenizer_of(theirs, load_tokenizer(manifest.tokenizer_path), f"the one {manifest.root} was prepared with")


def build_engine(cfg: dict, model: torch.nn.Module, env: DistEnv, load_universal: bool = False):
    """The DeepSpeed engine (ZeRO, AdamW, clipping, precision) and its lr scheduler; `load_universal`:
    it will load a universal checkpoint (trainer/reshard.py)."""
    import deepspeed  # after init_distributed has chosen the accelerator
    import deepspeed.ops

    # On CPU DeepSpeed JIT-compiles a shared-memory all-reduce (for inference) at every init, under a
    # lock in ~/.cache/torch_extensions; training never uses it, and a build killed midway leaves
    # the lock behind and every later init waiting on it forever.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    t_cfg = cfg["train"]
    config = deepspeed_config(t_cfg, cfg["deepspeed"], env.world_size, cfg["cluster"]["use_gpu"])
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, t_cfg["weight_decay"]),
        config=config,
        lr_scheduler=lambda opt: warmup_cosine_scheduler(opt, t_cfg),
    )
    _undo_state_making_step(engine)
    return engine, scheduler


def _undo_state_making_step(engine) -> None:
    """DeepSpeed's unfused mixed-precision wrapper (bf16 at ZeRO-0) makes the optimizer's state by one
    step on zero gradients: AdamW's step count then starts one ahead (its bias correction lags all run,
    the first update 0.73x as large) and the fp32 master weights take one weight decay at the full lr.
    Undone: no state (AdamW makes it at the first real step), masters as cloned from the model."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    wrapper = engine.optimizer
    if not isinstance(wrapper, FP16_UnfusedOptimizer):
        return
    wrapper.optimizer.state.clear()
    with torch.no_grad():
        for masters, params in zip(wrapper.fp32_groups, wrapper.fp16_groups):
            for master, param in zip(masters, params):
                master.copy_(param)


def _norm(t: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """The L2 norm in two levels, of blocks and then of their norms: torch's one-pass fp32 norm of a large
    tensor on CPU was 1.5e-4 off the float64 value (an embedding's gradient), this 1e-7, and faster."""
    flat = t.reshape(-1)
    whole = flat.numel() // block * block
    parts = torch.linalg.vector_norm(flat[:whole].view(-1, block), dim=1)
    return torch.linalg.vector_norm(torch.cat([parts, torch.linalg.vector_norm(flat[whole:]).view(1)]))


def _clip_or_drop_grads(engine, max_norm: float) -> tuple[float, bool]:
    """fp32 ZeRO-0 only (see deepspeed_guards_updates): clip, or drop non-finite gradients.

    Returns (gradient norm, skipped). Gradients are already averaged across ranks
    here, so every rank decides alike; with every .grad None, AdamW leaves
    parameters and its state untouched. Clipping matches DeepSpeed's own.
    """
    params = [p for p in engine.module.parameters() if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([_norm(p.grad.float()) for p in params])).item()
    if not math.isfinite(norm):
        for p in params:
            p.grad = None
        return norm, True
    coef = max_norm / (norm + 1e-6)
    if max_norm > 0 and coef < 1:
        for p in params:
            p.grad.mul_(coef)
    return norm, False


def _train_step(engine, scheduler, loader, loss_fn, t_cfg: dict, step: int, env: DistEnv,
                ds_guards: bool) -> tuple[torch.Tensor, torch.Tensor, float | None, bool]:
    """One optimizer step over train.grad_accum_steps micro-batches. Returns this rank's loss and
    cross-entropy (means over the micro-batches), the gradient norm and whether the update was skipped."""
    accum = t_cfg["grad_accum_steps"]
    total = torch.zeros((), device=env.device)
    ce_total = torch.zeros((), device=env.device)
    own_norm, own_skip = None, False
    for _ in range(accum):
        batch = next(loader).to(env.device, non_blocking=True)
        loss, ce = loss_fn(engine(batch[:, :-1]), batch[:, 1:], t_cfg["z_loss_weight"])
        loss = maybe_poison(loss, t_cfg["faults"], step, env.rank)
        engine.backward(loss)
        if not ds_guards and engine.is_gradient_accumulation_boundary():
            own_norm, own_skip = _clip_or_drop_grads(engine, t_cfg["grad_clip"])
        engine.step()
        if own_skip:
            rewind_one_step(scheduler)
        total += loss.detach()
        ce_total += ce.detach()
    skipped = own_skip or (ds_guards and not engine.was_step_applied())
    grad_norm = own_norm if own_norm is not None else engine.get_global_grad_norm()
    return total / accum, ce_total / accum, grad_norm, skipped


def _start_line(cfg: dict, num_params: int, world_size: int, resume: Path | None) -> str:
    t_cfg, threads = cfg["train"], torch.get_num_threads()
    where = f"resuming from {resume.name}" if resume else f"from {t_cfg['init_from'] or 'scratch'}"
    return (
        f"[train] {cfg['run']['name']}: {num_params:,} parameters, {world_size} rank{'s' * (world_size > 1)}, "
        f"ZeRO-{cfg['deepspeed']['stage']}, {t_cfg['precision']}{', compiled' if t_cfg['compile'] else ''}, "
        f"{t_cfg['max_steps']} steps, {where}; {threads} CPU thread{'s' * (threads > 1)} per rank"
    )


def _progress_line(step: int, max_steps: int, rec: dict, elapsed: float, steps_done: int) -> str:
    eta = elapsed / max(1, steps_done) * (max_steps - step)
    val = f" | val_loss {rec['val_loss']:.4f}" if "val_loss" in rec else ""
    util = f" | MFU {rec['mfu']:.1%}" if "mfu" in rec else ""
    return (
        f"[train] step {step}/{max_steps} | loss {rec['loss']:.4f}{val} | lr {rec['lr']:.2e} | "
        f"grad_norm {rec['grad_norm']:.3f} | {rec['tokens_per_s']:,.0f} tok/s{util} | ETA {eta:.0f}s"
    )


class NonFiniteTraining(TrainingError):
    pass


# Train settings a resume cannot change, and why (the rest it takes as given: training on, changed on purpose).
_KEPT_ON_RESUME = {
    "precision": "DeepSpeed keeps fp32 and bf16 optimizer state in other files",
    "seed": "it fixes the data order that the loader's saved position counts in",
}


def _check_resumable(state: dict, checkpoint: Path, model_cfg: OpenELMConfig, cfg: dict, world_size: int) -> None:
    """Refuse a resume this run cannot make, before DeepSpeed's loader fails on it with a traceback."""
    # Name and activation checkpointing change nothing the checkpoint holds (checkpointing may be turned on to fit);
    # a run started from train.init_from (its layers listed one by one) resumes under the model= it names too.
    saved = OpenELMConfig(**state["model"])
    if saved.architecture() != model_cfg.architecture():
        differences = "; ".join(model_cfg.architecture_differences(saved, "this run"))
        raise ValueError(f"checkpoint {checkpoint} was trained with another model config ({differences}); "
                         "use a new run.name, or the model it trained")
    saved_stage, stage = state["config"]["deepspeed"]["stage"], cfg["deepspeed"]["stage"]
    if saved_stage != stage:  # DeepSpeed lays out (and names) each stage's files its own way
        raise ValueError(
            f"checkpoint {checkpoint} was saved under ZeRO-{saved_stage}, this run uses ZeRO-{stage}: keep "
            f"deepspeed=zero{saved_stage} (offload may change), or start a new run.name from its export "
            "(train.init_from)"
        )
    for key, why in _KEPT_ON_RESUME.items():
        saved, ours = state["config"]["train"][key], cfg["train"][key]
        if saved != ours:
            raise ValueError(f"checkpoint {checkpoint} was saved with train.{key}={saved}, this run has {ours}: keep "
                             f"train.{key}={saved} ({why}), or start a new run.name from its export (train.init_from)")
    check_same_global_batch(state["config"], state["loader"]["world_size"], cfg, world_size, checkpoint)


# What `report` gets at each validation besides the step: what a sweep may compare trials on.
REPORTED_METRICS = ("val_loss", "val_perplexity", "loss", "ce_loss", "lr", "grad_norm", "tokens_per_s",
                    "step_time_s", "memory_gb", "tokens", "skipped", "mfu")


def check_storage_shared(cfg: dict) -> None:
    """Every rank as it starts, after the launcher made run.dir (a collective): a rank that cannot see it
    runs on a node that does not share storage_path (its data would read as "not prepared", its
    checkpoints be lost). Every rank stops, each naming what it knows, rather than the others waiting
    for it in their first collective."""
    visible = Path(cfg["run"]["dir"]).is_dir()
    (unseen,) = all_reduce_sums(0.0 if visible else 1.0)
    fix = (f"storage_path ({cfg['storage_path']}) must be a file system every node mounts at the same path "
           "(docs/cluster.md)")
    if not visible:
        raise FileNotFoundError(f"run.dir {cfg['run']['dir']} is not there on node {socket.gethostname()}, though "
                                f"the launcher made it: {fix}")
    if unseen:
        raise FileNotFoundError(f"run.dir {cfg['run']['dir']} is not there for {int(unseen)} of "
                                f"{torch.distributed.get_world_size()} ranks, on other nodes: {fix}")


def check_start(cfg: dict) -> None:
    """What train() refuses before its first step (a resume it cannot make, data that does not suit the
    model), for a launcher to say before it starts any worker, where the run's directory and the data
    are visible to it; the workers check again in any case."""
    resume = latest_checkpoint(Path(cfg["run"]["dir"], "checkpoints"))
    manifest = read_manifest(cfg["data"]["dir"]) if Path(cfg["data"]["dir"], MANIFEST_NAME).is_file() else None
    if resume is not None:
        state = read_client_state(resume)
        _check_resumable(state, resume, model_config(cfg), cfg, cfg["cluster"]["num_workers"])
        if manifest is not None:
            check_dataset_unchanged(state, resume, manifest)
    elif manifest is not None:
        _check_data(model_config(cfg), manifest, cfg["train"]["init_from"])


def _started_from(client: dict) -> str | None:
    """The Hugging Face directory the run was started from, as its checkpoint's client state records it
    (checkpoints before this record: the first invocation's config, if the checkpoint is its)."""
    return client.get("init_from", client["config"]["train"].get("init_from"))


def finished_run(cfg: dict, is_main: bool = True) -> dict | None:
    """The summary of a run already at train.max_steps, for a launcher to return without preparing
    data or starting any worker (one that would load nothing and train nothing); None for a run with
    steps to go. Only the main process writes and prints."""
    resume = latest_checkpoint(Path(cfg["run"]["dir"], "checkpoints"))
    client = read_client_state(resume) if resume is not None else None
    if client is None or client["step"] < cfg["train"]["max_steps"]:
        return None
    _check_resumable(client, resume, model_config(cfg), cfg, cfg["cluster"]["num_workers"])  # the same run?
    return _finished_run(cfg, resume, client, model_config(cfg), is_main=is_main, report=None)


def _final_validation(last: dict | None) -> dict:
    """The newest validation's loss and step (from a record with both): a run stopped between validations
    reports the one before."""
    return {"final_val_loss": last and last["val_loss"], "final_val_step": last and last["step"]}


def _finished_run(cfg: dict, checkpoint: Path, client: dict, model_cfg: OpenELMConfig, is_main: bool,
                  report: Callable[[dict], None] | None) -> dict:
    """A re-run of a run whose newest checkpoint is its last step: its summary, written anew if the run
    ended before writing it (or the file is an earlier invocation's, say the one a stop left, or one
    stopped at the step that max_steps has since been lowered to)."""
    run_dir, step = cfg["run"]["dir"], client["step"]
    summary = read_json(Path(run_dir, SUMMARY_NAME)) or {}
    metrics = Path(run_dir, "metrics.jsonl")
    # Where the run is now: a run directory copied or moved elsewhere (or renamed) still names the old one.
    here = {"run_name": cfg["run"]["name"], "checkpoint": str(checkpoint), "metrics": str(metrics),
            "data_dir": str(cfg["data"]["dir"])}
    if summary.get("steps") == step and not summary.get("stopped_by"):
        moved = any(summary.get(key) != value for key, value in here.items())
        summary = {**summary, **here}
        if moved and is_main:
            write_summary(run_dir, summary)
    else:
        last = [r for r in map(json.loads, complete_lines(metrics)) if r["step"] <= step]
        summary = {
            "run_name": cfg["run"]["name"], "steps": step, "resumed_from": checkpoint.name,
            "init_from": _started_from(client),
            "stopped_by": None, "skipped_steps": client.get("skipped_total", 0),
            "final_loss": last[-1]["loss"] if last else None,
            **_final_validation(next((r for r in reversed(last) if "val_loss" in r), None)),
            "losses": [], "num_params": non_embedding_params(model_cfg) + model_cfg.vocab_size * model_cfg.model_dim,
            **here, "wandb_dir": None,
        }
        if is_main:
            write_summary(run_dir, summary)
    if is_main:
        past = f", past train.max_steps={cfg['train']['max_steps']}" if step > cfg["train"]["max_steps"] else ""
        print(f"[train] {cfg['run']['name']} already finished at step {step}{past} ({checkpoint})\n"
              f"[train] a higher train.max_steps trains it on; another run.name trains anew (settings such as "
              f"train.eval_every apply to the steps still to train)", flush=True)
    if report is not None:  # e.g. a sweep trial that finished as its sweep was interrupted: Tune needs its metric
        report({"step": step, "loss": summary["final_loss"], "val_loss": summary["final_val_loss"]})
    return summary


def train(cfg: dict, report: Callable[[dict], None] | None = None) -> dict:
    """Train (or resume) the run; returns its summary. `report`, called on every rank after each
    validation with {step, loss, val_loss, ...}, lets a launcher forward results (Ray Train, Tune)."""
    t_cfg, run_dir = cfg["train"], cfg["run"]["dir"]
    if not cfg["cluster"]["use_gpu"]:  # on CPU, each step reuses the last one's freed memory (host_memory.py)
        keep_freed_memory()
    ckpt_root = Path(run_dir, "checkpoints")
    env = init_distributed(cfg["cluster"]["use_gpu"])
    manifest = read_manifest(cfg["data"]["dir"])
    model_cfg = model_config(cfg)
    resume = from_rank0(latest_checkpoint(ckpt_root))
    _check_data(model_cfg, manifest, t_cfg["init_from"] if resume is None else None)
    load_from = resume  # or its universal form, on another world size
    if resume is not None:
        check_intact(resume)
        client = read_client_state(resume)
        _check_resumable(client, resume, model_cfg, cfg, env.world_size)
        check_dataset_unchanged(client, resume, manifest)
        if client["step"] >= t_cfg["max_steps"]:  # a finished run, re-run: nothing to do, its summary stands
            return _finished_run(cfg, resume, client, model_cfg, env.is_main, report)
        saved_world = client["loader"]["world_size"]
        if needs_universal(saved_world, env.world_size, cfg["deepspeed"]["stage"]):
            load_from, took = universal_checkpoint(resume, saved_world, env.is_main)
            if env.is_main:
                print(f"[train] {resume.name} was saved by {saved_world} rank{'s' * (saved_world > 1)}: converted for {env.world_size} "
                      f"in {took:.1f}s ({load_from})", flush=True)
    model = build_model(model_cfg, seed=t_cfg["seed"]).to(env.device)
    num_params = model.num_params()  # before ZeRO-3 partitions the parameters away
    if t_cfg["init_from"] and resume is None:
        from trainer.hf import load_hf_checkpoint

        model.load_state_dict(load_hf_checkpoint(t_cfg["init_from"]).state_dict())
    engine, scheduler = build_engine(cfg, model, env, load_universal=load_from != resume)
    loss_fn = lm_loss
    if t_cfg["compile"]:  # compiles in place: checkpoints keep the plain module's names
        engine.compile()
        loss_fn = torch.compile(lm_loss)
    tokenizer_fp, state = manifest.data["tokenizer"]["fingerprint"], None
    if resume is not None:
        with keeping_configured_hyperparameters(engine.optimizer):  # a resume with other values on purpose
            state = load_checkpoint(engine, resume) if load_from == resume else load_universal(engine, load_from)
        follow_schedule(scheduler, t_cfg["lr"])
        tokenizer_fp = state["tokenizer_fingerprint"]  # the data must still be what the run trained on
        release_freed_memory()  # what loading held: the steps' own peak is smaller
    loader = TokenLoader(
        manifest.root, "train", env.rank, env.world_size, t_cfg["micro_batch_size"], t_cfg["seed"],
        num_workers=t_cfg["loader_workers"], tokenizer_fingerprint=tokenizer_fp,
    )
    start_step = 0
    if state is not None:
        skipped = loader.load_state_dict(state["loader"])
        if skipped and env.is_main:
            saved = state["loader"]
            read = saved["world_size"] * saved["position"]
            print(f"[train] {resume.name} had read {read} sample{'s' if read > 1 else ''} of epoch {saved['epoch']}, "
                  f"which {env.world_size} ranks cannot share evenly: the data goes on {skipped} "
                  f"sample{'s' if skipped > 1 else ''} later", flush=True)
        set_rng_state(state["rng"])
        start_step = state["step"]
    if t_cfg["eval_every"]:  # a val split too small for the ranks fails now, not at the first evaluation
        validation_batches(manifest.root, env.rank, env.world_size, t_cfg["micro_batch_size"], 1, tokenizer_fp)
    metrics = MetricsLogger(run_dir, cfg, enabled=env.is_main, resume_step=start_step)
    if env.is_main:  # an earlier invocation's (a stop's, or a run's whose checkpoints are gone): stale now
        Path(run_dir, SUMMARY_NAME).unlink(missing_ok=True)
        if resume is None:  # DeepSpeed's pointer to the checkpoint its zero_to_fp32.py converts: none is left
            (ckpt_root / "latest").unlink(missing_ok=True)
        print(_start_line(cfg, num_params, env.world_size, resume), flush=True)

    def validate() -> dict:
        """Validation loss over the val split; every rank takes part (ZeRO-3 gathers inside the forward)."""
        batches = validation_batches(
            manifest.root, env.rank, env.world_size, t_cfg["micro_batch_size"], t_cfg["eval_batches"], tokenizer_fp,
            manifest.fingerprint,  # the dataset as this invocation found it
        )
        r = evaluate_loss(engine, batches, env.device, distributed=True)
        release_freed_memory()
        return {"val_loss": r["ce_loss"], "val_perplexity": r["perplexity"]}

    ds_guards = deepspeed_guards_updates(t_cfg, cfg["deepspeed"])
    flops = flops_per_token(model_cfg, manifest.seq_len)
    peak = device_peak_flops(env.device)  # per rank: MFU divides by world size x peak
    if peak is None and env.is_main:
        print(f"[train] MFU not logged: no bf16 peak known for {torch.cuda.get_device_name(env.device)} "
              "(trainer/flops.py, PEAK_FLOPS)", flush=True)
    tokens_per_step = t_cfg["micro_batch_size"] * t_cfg["grad_accum_steps"] * env.world_size * manifest.seq_len
    preemption = PreemptionWatch(run_dir, env.is_main)
    # Skipped-step counts travel in checkpoints: a resumed run stops where the uninterrupted one would.
    skipped_in_row, skipped_total = (state or {}).get("skipped_in_row", 0), (state or {}).get("skipped_total", 0)
    started_from = t_cfg["init_from"] if state is None else _started_from(state)  # a resume needs it no longer
    losses, last_saved = [], resume
    start, step, stopped_by = time.perf_counter(), start_step, None

    def checkpoint(at_step: int) -> Path:
        client = {"step": at_step, "loader": loader.state_dict(), "rng": rng_state(), "config": cfg,
                  "model": asdict(model_cfg), "tokenizer_fingerprint": tokenizer_fp,
                  "dataset_fingerprint": manifest.fingerprint,
                  "skipped_in_row": skipped_in_row, "skipped_total": skipped_total, "init_from": started_from}
        path = save_checkpoint(engine, ckpt_root, at_step, client, env.is_main, t_cfg["keep_checkpoints"],
                               lambda: maybe_kill(t_cfg["faults"], at_step, env.rank, run_dir, "kill_in_save_at_step"))
        release_freed_memory()
        return path

    collector = StepCollector(t_cfg["gc_every"])
    collector.start()
    failed = True  # until the loop ends without an exception (W&B marks the run so)
    try:
        for step in range(start_step + 1, t_cfg["max_steps"] + 1):
            maybe_kill(t_cfg["faults"], step, env.rank, run_dir)
            step_start = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            loss, ce, grad_norm, skipped = _train_step(engine, scheduler, loader, loss_fn, t_cfg, step, env, ds_guards)
            step_time = time.perf_counter() - step_start
            record = {
                "loss": mean_across_ranks(loss),
                "ce_loss": mean_across_ranks(ce),
                "lr": lr,
                "grad_norm": float("nan") if grad_norm is None else float(grad_norm),
                "tokens_per_s": tokens_per_step / step_time,
                "memory_gb": peak_memory_gb(env.device),
                "step_time_s": step_time,
                "tokens": step * tokens_per_step,
                "skipped": int(skipped),
            }
            if peak:
                record["mfu"] = mfu(tokens_per_step / step_time / env.world_size, flops, peak)
            if t_cfg["eval_every"] and (step % t_cfg["eval_every"] == 0 or step == t_cfg["max_steps"]):
                record.update(validate())
                if report is not None:
                    report({"step": step, **record})
            skipped_total += skipped
            skipped_in_row = skipped_in_row + 1 if skipped else 0
            losses.append(record["loss"])
            metrics.log(step, record)
            if env.is_main and skipped:
                print(f"[train] step {step}: non-finite loss or gradient norm, update skipped", flush=True)
            if skipped_in_row >= t_cfg["max_skipped_in_row"]:
                newest = f"the last good checkpoint is {last_saved.name if last_saved else 'none (no checkpoint yet)'}"
                if last_saved is not None and last_saved == resume:  # nothing this invocation vouches for
                    newest = f"the newest checkpoint is {resume.name}, the one this run resumed from"
                raise NonFiniteTraining(
                    f"training stopped at step {step}: {skipped_in_row} steps in a row had a non-finite loss or "
                    f"gradient norm; {newest} in {ckpt_root}"
                )
            if env.is_main and (step % t_cfg["log_every"] == 0 or step == t_cfg["max_steps"] or "val_loss" in record):
                elapsed = time.perf_counter() - start
                print(_progress_line(step, t_cfg["max_steps"], record, elapsed, step - start_step), flush=True)
            maybe_sigterm(t_cfg["faults"], step, run_dir, env.rank)
            stopped_by = preemption.any_rank_requested(env.device)
            every = t_cfg["checkpoint_every"]
            if stopped_by or step == t_cfg["max_steps"] or (every and step % every == 0):
                last_saved = checkpoint(step)
            if stopped_by:
                preemption.consume()
                if env.is_main:
                    print(f"[train] stop requested ({stopped_by}): saved {last_saved}, stopping at step {step}",
                          flush=True)
                break
            collector.after_step(step)
        failed = False
    finally:
        collector.stop()
        loader.close()
        preemption.close()
        # What the run came to, for W&B's summary (a failed run's too) and summary.json.
        outcome = {"skipped_steps": skipped_total, "final_loss": losses[-1] if losses else None,
                   **_final_validation(metrics.last_validation)}
        try:
            metrics.summary(outcome)
        finally:
            metrics.close(failed=failed)

    summary = {
        "run_name": cfg["run"]["name"],
        "steps": step,
        "resumed_from": resume.name if resume else None,
        "init_from": started_from,
        "stopped_by": stopped_by if step < t_cfg["max_steps"] else None,  # a stop at the last step ends it anyway
        **outcome,
        "losses": losses,
        "num_params": num_params,
        "data_dir": str(manifest.root),
        "checkpoint": str(last_saved) if last_saved else None,
        "metrics": str(metrics.path),
        "wandb_dir": str(metrics.wandb_dir) if metrics.wandb_dir else None,
    }
    if env.is_main:
        write_summary(run_dir, summary)
    return summary

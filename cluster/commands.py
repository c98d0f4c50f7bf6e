"""What each `elmforge` verb does, given the composed config and its own flags: thin glue over
data_pipelines/ and trainer/, printing what a user needs to see. Heavy imports (torch, Ray) happen in
the verbs that need them, so `--help`, `jobs` and `report` start quickly."""

import os
import tempfile
from pathlib import Path

TORCHRUN_ENV = "TORCHELASTIC_RUN_ID"  # set by torchrun in every process it starts


def launched_by_torchrun() -> bool:
    return TORCHRUN_ENV in os.environ


def _prepare(cfg: dict, use_ray: bool = True, for_run: bool = False) -> Path:
    """The dataset, built or reused. for_run: the run's own, checked first against what its newest
    checkpoint trained on (which computes the fingerprint prepare then takes)."""
    from data_pipelines.prepare import prepare
    from trainer.run_data import check_run_data

    fingerprint = check_run_data(cfg) if for_run else None

    data, start_ray = dict(cfg["data"]), None
    if data["workers"] != 0:
        if use_ray:  # tokenizer actors run on the configured Ray cluster, started only if there is work
            from cluster.ray_runtime import connect

            def start_ray():
                connect(cfg["cluster"])
        elif data["workers"] is None:
            data["workers"] = 0  # no Ray on this path unless asked for
    return prepare(data, cfg["tokenizer"], force=cfg["prepare"]["force"], before_build=start_ray,
                   fingerprint=fingerprint)


def require_writable(path: str, key: str) -> None:
    """Before any work: a directory that will be written must be creatable where it is, or the run would
    fail after preparing data and starting Ray with an errno that names no setting. Creates nothing."""
    existing = next(p for p in (Path(path), *Path(path).parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"{key}={path}: cannot be created, {existing} is a file")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".elmforge-write-check-", dir=existing))
    except OSError as e:
        raise PermissionError(f"{key}={path}: cannot be created or written ({existing}: {e.strerror})") from None


def cmd_prepare(cfg: dict, args) -> None:
    from data_pipelines.integrity import verify_dataset
    from data_pipelines.prepare import describe_plan

    options = cfg["prepare"]
    if not (options["dry_run"] or options["verify"]):
        require_writable(cfg["data"]["dir"], "data.dir")
    if options["dry_run"]:
        print(describe_plan(cfg["data"], cfg["tokenizer"], force=options["force"]))
    elif options["verify"]:
        verify_dataset(cfg["data"]["dir"])
    else:
        _prepare(cfg)


def _train_here(cfg: dict) -> dict:
    """The Ray-free path: this process (a world of one) or each process torchrun started."""
    import torch.distributed as dist

    from trainer.distributed import init_distributed
    from trainer.preemption import clear_stop_request
    from trainer.train_loop import check_storage_shared, train

    env = init_distributed(cfg["cluster"]["use_gpu"])
    wanted = cfg["cluster"]["num_workers"]
    if env.world_size != wanted:
        if launched_by_torchrun():
            raise ValueError(f"cluster.num_workers={wanted} but torchrun started {env.world_size} processes: set "
                             f"cluster.num_workers={env.world_size}, or leave it out (torchrun's count is taken)")
        raise ValueError(f"cluster.num_workers={wanted} but cluster.launcher=local trains in this one process: set "
                         f"cluster.num_workers=1, or start {wanted} with torchrun --nproc_per_node={wanted} -m "
                         "cluster.cli train ...")
    run_dir = Path(cfg["run"]["dir"])
    new = not run_dir.exists()
    if env.is_main:
        _prepare(cfg, use_ray=False, for_run=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        clear_stop_request(run_dir)
    dist.barrier()
    check_storage_shared(cfg)  # torchrun's ranks on other nodes
    try:
        return train(cfg)
    except BaseException:
        if env.is_main and new and run_dir.is_dir() and not any(run_dir.iterdir()):  # refused before it wrote
            run_dir.rmdir()
        raise


def cmd_train(cfg: dict, args) -> None:
    from trainer.train_loop import check_init_from, finished_run

    for key in ("data.dir", "run.dir"):
        section, name = key.split(".")
        require_writable(cfg[section][name], key)
    # A finished run needs neither its data nor workers. Under torchrun every rank finds it so; rank 0 answers.
    answers = int(os.environ.get("RANK", 0)) == 0
    if (summary := finished_run(cfg, is_main=answers)) is not None:
        if answers:
            _print_summary(cfg, summary)
        return
    check_init_from(cfg)  # before the data is prepared (or rebuilt) for a model that cannot start
    if cfg["cluster"]["launcher"] == "local" or launched_by_torchrun():
        summary = _train_here(cfg)
        if not (summary and int(os.environ.get("RANK", 0)) == 0):
            return
    else:
        from cluster.launch import launch_training
        from cluster.ray_runtime import require_embedded_cpus
        from trainer.distributed import require_gpus

        cluster = cfg["cluster"]
        if cluster["address"] is None:  # an embedded Ray has its CPUs and this machine's GPUs, never more
            require_embedded_cpus(cluster)
            if cluster["use_gpu"]:
                require_gpus(cluster["min_workers"] or cluster["num_workers"], "on this machine (one per worker)")
        _prepare(cfg, for_run=True)
        summary = launch_training(cfg)
    _print_summary(cfg, summary)


def _print_summary(cfg: dict, summary: dict) -> None:
    state = "finished"
    if summary["stopped_by"]:
        state = f"stopped on request ({summary['stopped_by']}; re-run the same command to resume)"
    print(f"\n[elmforge] training {state}")
    if summary["final_loss"] is not None:
        print(f"  final loss   {summary['final_loss']:.4f}")
    if summary.get("final_val_loss") is not None:
        at = summary.get("final_val_step")
        at = f" (at step {at})" if at is not None and at != summary["steps"] else ""
        print(f"  val loss     {summary['final_val_loss']:.4f}{at}")
    print(f"  shards       {summary['data_dir']}")
    print(f"  checkpoint   {summary['checkpoint']}")
    print(f"  metrics      {summary['metrics']}")
    if summary.get("wandb_dir"):
        print(f"  W&B run      {summary['wandb_dir']}")
        if cfg["logger"]["mode"] == "offline":
            from trainer.metrics import offline_runs

            # A resumed run has one directory per invocation; W&B syncs one run's files in start order.
            print(f"  upload with  wandb sync {' '.join(map(str, offline_runs(summary['wandb_dir'])))}")


def _checkpoints_to_export(cfg: dict, args) -> list[Path]:
    from trainer.checkpoint import complete_checkpoints, require_complete

    if args.checkpoint:
        given = [require_complete(p) for p in args.checkpoint]
        if len({p.resolve() for p in given}) < len(given):
            raise ValueError(f"--checkpoint {' '.join(args.checkpoint)}: a checkpoint is given twice")
        return given
    found = complete_checkpoints(Path(cfg["run"]["dir"], "checkpoints"))
    if not found:
        raise FileNotFoundError(f"no complete checkpoint under {cfg['run']['dir']}/checkpoints (is run.name right?)")
    if len(found) < args.average:
        raise ValueError(
            f"--average {args.average}: only {len(found)} complete checkpoint{'s' if len(found) > 1 else ''} in "
            f"{cfg['run']['dir']}/checkpoints "
            f"({', '.join(p.name for p in found)}): average at most {len(found)}, or keep more while training "
            f"(train.keep_checkpoints={args.average} or more, with train.checkpoint_every set)")
    return [require_complete(p) for p in found[-args.average :]]


def cmd_export(cfg: dict, args) -> None:
    from trainer.checkpoint import read_client_state
    from trainer.evaluate import dataset_tokenizer_file
    from trainer.hf import export_checkpoints
    from trainer.model import OpenELMConfig

    checkpoints = _checkpoints_to_export(cfg, args)
    clients = [read_client_state(c) for c in checkpoints]
    if not _one_tokenizer(clients):  # their embeddings' rows mean different tokens: an average is no model
        raise ValueError("--checkpoint: these checkpoints were trained with different tokenizers (" + ", ".join(
            f"{p} {(c.get('tokenizer_fingerprint') or 'unknown')[:12]}" for p, c in zip(checkpoints, clients))
            + "); average checkpoints of one tokenizer only")
    runs = {checkpoint.resolve().parent for checkpoint in checkpoints}  # each run's checkpoints/ directory
    out = _export_dir(cfg, args, checkpoints, runs)
    client = clients[-1]
    data_dir = client["config"]["data"]["dir"]
    found = dataset_tokenizer_file(data_dir, client.get("tokenizer_fingerprint"))
    export_checkpoints(checkpoints, out, OpenELMConfig(**client["model"]), tokenizer_dir=found[0] if found else None)

    def name(checkpoint: Path) -> str:  # with several runs, each is named with its run's directory
        return checkpoint.name if len(runs) == 1 else f"{checkpoint.parent.parent.name}/{checkpoint.name}"

    missing = f" (no tokenizer: the training data at {data_dir} is gone or was re-prepared with another one)"
    print(f"[export] {out}: {'average of ' if len(checkpoints) > 1 else ''}{', '.join(map(name, checkpoints))}"
          f"{'' if found else missing}")
    print(f"  load with    AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    # Each run's newest checkpoint given: a stopped run's (or one still training) is not the run's result.
    for run in sorted(runs):
        checkpoint, state = max(((c, s) for c, s in zip(checkpoints, clients) if c.resolve().parent == run),
                                key=lambda given: given[1]["step"])
        if state["step"] < (max_steps := state["config"]["train"]["max_steps"]):
            print(f"  note         {name(checkpoint)} is not the run's last step (train.max_steps={max_steps}): it "
                  "stopped early or is still training; export again once it has finished")


def _one_tokenizer(clients: list[dict]) -> bool:
    """The checkpoints' tokenizers are one: the same file, or the same tokens and ids saved otherwise (as
    transformers re-saves one), which only their datasets' tokenizer files can show."""
    from trainer.evaluate import dataset_tokenizer

    fingerprints = {c.get("tokenizer_fingerprint"): c["config"]["data"]["dir"] for c in clients}
    if len(fingerprints) == 1:
        return True
    found = [dataset_tokenizer(data_dir, fp) if fp else None for fp, data_dir in fingerprints.items()]
    return None not in found and all(t.same_ids_as(found[0]) for t in found[1:])


def _export_dir(cfg: dict, args, checkpoints: list[Path], runs: set[Path]) -> Path:
    """--out, else the hf/ of the run the checkpoints are of: run.dir's, or given checkpoints' own run's."""
    if args.out:
        return Path(args.out)
    if not args.checkpoint:
        return Path(cfg["run"]["dir"], "hf")
    if len(runs) == 1 and (only := next(iter(runs))).name == "checkpoints":
        return only.parent / "hf"
    what = "checkpoints of several runs" if len(runs) > 1 else f"{checkpoints[0]}, outside a run's checkpoints/,"
    raise ValueError(f"--checkpoint: {what} belong to no one run directory to export into: give --out <dir>")


def _device(cfg: dict):
    import torch

    from trainer.distributed import require_gpus

    if cfg["cluster"]["use_gpu"]:
        require_gpus(1, "to run the model on")
        return torch.device("cuda")
    return torch.device("cpu")


def _model_and_tokenizer(cfg: dict, args, required: bool):
    """The model at args.path and its tokenizer, or None: --tokenizer if given, else the one found with the
    model (beside it, or the run's dataset), else that of a dataset named with data.dir=."""
    from data_pipelines.tokenizer import load_tokenizer
    from trainer.evaluate import dataset_tokenizer, load_for_eval

    model, found = load_for_eval(args.path)
    if args.tokenizer:
        given = load_tokenizer(args.tokenizer)
        if found is not None and not given.same_ids_as(found):  # the model's rows are its own tokenizer's ids
            raise ValueError(f"--tokenizer {args.tokenizer} ({given.fingerprint[:12]}) has other tokens or ids than "
                             f"the tokenizer found with {args.path} ({found.fingerprint[:12]}), whose ids the model "
                             "was trained on: leave --tokenizer out")
        found, origin = given, f"--tokenizer {args.tokenizer}"
    # Only a data.dir the user named: the default one belongs to the demo's data, not to this model.
    elif found is None and _data_dir_named(args):
        found, origin = dataset_tokenizer(cfg["data"]["dir"]), f"the tokenizer of data.dir={cfg['data']['dir']}"
    else:
        origin = "the tokenizer found with the model"
    if found is None and required:
        raise ValueError(f"{args.path}: no tokenizer beside the model, in its training data or in a data.dir= given; "
                         "name one with --tokenizer, or a prepared dataset with data.dir=")
    if found is not None and found.vocab_size > model.cfg.vocab_size:  # its ids would index past the embedding
        raise ValueError(f"{origin} has {found.vocab_size} tokens, more than the {model.cfg.vocab_size} of the model "
                         f"at {args.path}: use the tokenizer the model was trained with (and data prepared with it)")
    return model, found


def _within_context(model, seq_len: int, what: str, fix: str) -> None:
    if seq_len > model.cfg.max_context_length:
        raise ValueError(f"{what}: longer than the model's context ({model.cfg.max_context_length} tokens, "
                         f"max_context_length); {fix}")


def _data_dir_named(args) -> bool:
    return any(o.startswith("data.dir=") for o in args.overrides)


def cmd_eval(cfg: dict, args) -> None:
    import itertools

    from data_pipelines.manifest import MANIFEST_NAME, read_manifest
    from trainer.checkpoint import read_client_state
    from trainer.evaluate import evaluate_loss, text_batches, validation_batches

    is_checkpoint = not Path(args.path, "config.json").is_file()
    # Scoring the val split needs no tokenizer, but one tells which data suits this model: a Hugging
    # Face directory without one, and no data.dir=, would be scored on the demo's data.
    need_tokenizer = bool(args.text) or not (is_checkpoint or _data_dir_named(args))
    model, tokenizer = _model_and_tokenizer(cfg, args, required=need_tokenizer)
    if args.text:
        # The length the checkpoint trained at; a Hugging Face directory records none.
        trained = read_client_state(args.path)["config"]["data"]["seq_len"] if is_checkpoint else None
        seq_len = args.seq_len or trained or cfg["data"]["seq_len"]
        what = (f"--seq-len {seq_len}" if args.seq_len else f"data.seq_len={seq_len}, the checkpoint's" if trained
                else f"data.seq_len={seq_len} (a Hugging Face directory records no length)")
        _within_context(model, seq_len, what, f"give --seq-len {model.cfg.max_context_length} or less")
        texts = text_batches(args.text, tokenizer, seq_len, args.batch_size, args.text_field, args.separator)
        batches = itertools.islice(texts, args.max_batches)
        where = " ".join(args.text)
    else:
        data_dir = cfg["data"]["dir"]
        if is_checkpoint and not _data_dir_named(args):
            data_dir = read_client_state(args.path)["config"]["data"]["dir"]  # the run's own data by default
            if not Path(data_dir, MANIFEST_NAME).is_file():
                raise FileNotFoundError(f"{args.path} trained on {data_dir}, which holds no prepared dataset now: "
                                        "name one with data.dir=, score files with --text, or prepare the run's data "
                                        "again (its data settings)")
        elif not _data_dir_named(args) and not Path(data_dir, MANIFEST_NAME).is_file():
            raise FileNotFoundError(f"no prepared dataset at {data_dir} (the default data.dir) to score {args.path} "
                                    "on: name one with data.dir=, or score files with --text")
        if tokenizer is not None:
            _require_data_of(tokenizer, data_dir, args)
        length = read_manifest(data_dir).seq_len
        _within_context(model, length, f"{data_dir} was prepared with data.seq_len={length}",
                        f"score files with --text --seq-len {model.cfg.max_context_length}, or a dataset prepared "
                        f"with data.seq_len={model.cfg.max_context_length} or less")
        batches = validation_batches(data_dir, 0, 1, args.batch_size, args.max_batches, whole=True)
        where = f"{data_dir} (val split)"
    r = evaluate_loss(model.to(_device(cfg)), batches, _device(cfg))
    print(f"[eval] {args.path} on {where}: loss {r['ce_loss']:.4f} | perplexity {r['perplexity']:.2f} | "
          f"{r['tokens']:,} tokens")


def _require_data_of(tokenizer, data_dir: str, args) -> None:
    """The val split to score was tokenized by the model's tokenizer (or one with its ids)."""
    from data_pipelines.manifest import read_manifest
    from data_pipelines.tokenizer import load_tokenizer

    manifest = read_manifest(data_dir)
    if not tokenizer.same_ids_as(load_tokenizer(manifest.tokenizer_path)):
        whose = f"--tokenizer {args.tokenizer}" if args.tokenizer else f"the tokenizer of {args.path}"
        raise ValueError(
            f"{whose} ({tokenizer.fingerprint[:12]}) is not the one {manifest.root} was tokenized with "
            f"({manifest.data['tokenizer']['fingerprint'][:12]}): score on data prepared with it (data.dir=), "
            "or score text files with --text")


def cmd_generate(cfg: dict, args) -> None:
    from trainer.sampling import complete

    model, tokenizer = _model_and_tokenizer(cfg, args, required=True)
    text = complete(
        model.to(_device(cfg)), tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature or 1.0, top_k=args.top_k, greedy=args.greedy, seed=args.seed,
    )
    print(args.prompt + text)


def cmd_submit(cfg: dict, args) -> None:
    from cluster.config import ConfigError
    from cluster.submit import UNSUCCESSFUL, SubmitError, follow, submit_job

    if cfg["sweep"]:  # the job would train one run with the sweep's train settings, and sweep nothing
        raise ConfigError(f"sweep={cfg['sweep']['name']}: submit sends `elmforge train`, which does not sweep; run "
                          "`elmforge sweep` on a cluster node, or submit it with `ray job submit` "
                          "(docs/cluster.md, section 6)")
    # The job runs in a copy of working_dir that Ray unpacks in a temporary directory and deletes later:
    # what it writes must go to an absolute path (the last one given is the one the job takes).
    # ~ is the home directory on the node that runs the job; null (run.dir, data.dir) derives from storage_path.
    for key in ("storage_path", "run.dir", "data.dir"):
        given = [o.split("=", 1)[1].strip("\"'") for o in args.overrides if o.lstrip("+").startswith(f"{key}=")]
        value = given[-1] if given else None
        if (value is None and key == "storage_path") or (value not in (None, "null") and
                                                          not os.path.isabs(os.path.expanduser(value))):
            relative = f"{key}={value} is relative; " if value else ""
            raise ConfigError(f"{relative}submit needs {key}=<absolute path on the cluster's shared storage>")
    job_id, url = submit_job(cfg, args.overrides)
    print(f"[submit] job {job_id}\n  dashboard    {url}\n  logs         elmforge jobs logs {job_id} --follow")
    if args.wait:
        status = follow(cfg["submit"], job_id)
        print(f"[submit] job {job_id}: {status}")
        if status in UNSUCCESSFUL:
            raise SubmitError(f"job {job_id} ended {status}")


def cmd_jobs(cfg: dict, args) -> int:
    """The exit status: `jobs status` or `logs --follow` of a job that failed or was stopped is 1, as with
    `submit --wait`."""
    from cluster.submit import UNSUCCESSFUL, client, follow, job_error, resolve_address

    jobs = client(cfg["submit"])
    try:
        if args.action == "list":
            # Ray lists every driver that joined the cluster too (a sweep run on the head, a Ray Client):
            # those have no submission id, and no log or stop through the Jobs API.
            listed = jobs.list_jobs()
            found = sorted((j for j in listed if j.submission_id), key=lambda j: j.start_time or 0)
            width = max((len(job.submission_id) for job in found), default=0)
            for job in found:
                print(f"{job.submission_id:<{width}}  {job.status.value:<9}  {job.entrypoint}")
            if not found:
                print(f"no jobs on {resolve_address(cfg['submit'])}")
            if drivers := len(listed) - len(found):
                print(f"(and {drivers} Ray driver{'s' if drivers > 1 else ''} that joined the cluster without "
                      "`elmforge submit`: `ray list jobs` shows them)")
        elif args.action == "status":
            info = jobs.get_job_info(args.job_id)
            print(f"{args.job_id}: {info.status.value}{_job_message(info.message, args.job_id)}")
            return 1 if info.status.value in UNSUCCESSFUL else 0
        elif args.action == "logs":
            if args.follow:
                return 1 if follow(cfg["submit"], args.job_id) in UNSUCCESSFUL else 0
            else:
                print(jobs.get_job_logs(args.job_id), end="")
        elif args.action == "stop":
            print(f"{args.job_id}: {'stop requested' if jobs.stop_job(args.job_id) else 'already ended'}")
    except BrokenPipeError:  # stdout closed (`jobs list | head -1`): not the cluster's doing
        raise
    except (RuntimeError, OSError) as e:
        raise job_error(e, args.job_id, cfg["submit"]) from None
    return 0


def _job_message(message: str | None, job_id: str) -> str:
    """Ray's message about a job, on the one line `jobs status` prints: a failed job's comes with the
    last 20,000 characters of its log, which `jobs logs` shows whole."""
    if not message:
        return ""
    first = message.strip().splitlines()[0]
    cut = first.split(", last available logs")[0]
    return f" - {cut}" + (f" (its log: elmforge jobs logs {job_id})" if cut != message.strip() else "")


def cmd_sweep(cfg: dict, args) -> None:
    from cluster.sweep import run_sweep

    run_sweep(cfg, prepare_data=lambda: _prepare(cfg))

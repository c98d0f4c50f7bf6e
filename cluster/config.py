"""Compose, validate and finalise the config every verb runs on.

compose_config(overrides) -> a plain dict with every path absolute and run.name
set, or ConfigError with one message naming each key at fault and the fix.
"""

import dataclasses
import hashlib
import json
import math
import os
import re
import typing
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

import conf
from cluster import config_schema
from cluster.config_schema import ElmConfig
from data_pipelines.sources import PACKAGE_SCHEME, PACKAGED_BUILDERS, hashed_specs
from trainer.model_config import OpenELMConfig

ConfigStore.instance().store(name="elmforge_schema", node=ElmConfig)

# Keys whose change changes the trained model: they name the run, so a re-run resumes.
RESULT_KEYS = ("model", "data", "tokenizer", "train", "deepspeed")


class ConfigError(ValueError):
    """A config that cannot run; the message names the key(s) and how to fix them."""


def compose_raw(overrides: list[str]):
    # `sweep.space=<dict>` replaces the sweep file's space: Hydra would merge it into the file's (and refuse
    # keys the file lacks), so it is set after composing. cluster/sweep.py checks the keys in it.
    space = [o for o in overrides if o.startswith("sweep.space=")]
    _refuse_null_groups(overrides)
    try:
        with initialize_config_module(config_module="conf", version_base="1.3"):
            raw = compose(config_name="config", overrides=[o for o in overrides if o not in space])
        if space and raw.sweep is None:
            raise ConfigError(f"{space[-1]}: choose the sweep it changes, e.g. sweep=lr_tiny")
        if space:
            raw.sweep.space = OverridesParser.create().parse_overrides(space[-1:])[0].value()
        return raw
    except ConfigError:
        raise
    except (HydraException, OmegaConfBaseException) as e:
        message = _explain(e)
        added = re.match(r"Multiple values for (\w+)\.", message)
        if added:  # Hydra's advice is for a defaults list; on the command line `+` adds a group, which is set
            given = next((o for o in overrides if o.lstrip("+").startswith(f"{added[1]}=")), f"{added[1]}=...")
            message = f"{given}: {added[1]} is in conf/config.yaml's defaults list: give {given.lstrip('+')} (no +)"
        raise ConfigError(message + _unknown_key_hint(message, overrides)) from None
    except (ValueError, TypeError) as e:  # Hydra's own, on an override it cannot read (`=5`, `cluster=[1,2]`)
        raise ConfigError(f"{e}, in the overrides {' '.join(overrides)}") from None


def is_override(arg: str) -> bool:
    """`key=value` with a key of the config (or a group, `experiment=`), not a path that holds `=`."""
    found = re.match(r"[+~]*([\w.]+)=", arg)
    return bool(found) and found[1].split(".")[0] in ROOT_KEYS


CONF_DIR = Path(conf.__file__).parent
GROUPS = {p.name for p in CONF_DIR.iterdir() if p.is_dir() and not p.name.startswith("_")}  # model=, experiment=, ...
ROOT_KEYS = {f.name for f in dataclasses.fields(ElmConfig)} | GROUPS


def _refuse_null_groups(overrides: list[str]) -> None:
    """`sweep=null` reads like `sweep: null` in conf/config.yaml, but Hydra takes a group's option on
    the command line (or its removal, `~sweep`) and fails on null with a traceback."""
    for o in overrides:
        group, _, value = o.lstrip("+").partition("=")
        if (value.lower() == "null" or value.startswith("[")) and group in GROUPS:
            options = ", ".join(sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")))
            unset = f", or leave it out with ~{group}" if group in ("sweep", "experiment") else ""
            raise ConfigError(f"{o}: {group} is a config group: choose one of its options ({options}){unset}")


NOISE = ("reference_type=", "object_type=", "To append to your config", "Config search path", "provider=",
         "Value '$VALUE' of type")  # OmegaConf's message template, under the filled-in one


def _explain(e: Exception) -> str:
    msg = str(e).strip()
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause).strip() and str(cause).strip() not in msg:
        msg += "\n" + str(cause).strip()
    msg = "\n".join(line for line in msg.splitlines() if not line.strip().startswith(NOISE)).strip()
    if "not in struct" in msg or "not in '" in msg:
        msg += "\nfix: check the key's spelling with `--cfg job`; only keys of the schema are accepted"
    return msg


def _unknown_key_hint(message: str, overrides: list[str]) -> str:
    """For a key unknown to a schema class (a misspelt key inside a list such as data.sources, where
    OmegaConf names neither the list nor the override): the override it came from and the keys allowed."""
    found = re.search(r"Key '(\w+)' not in '(\w+)'", message)
    schema = getattr(config_schema, found[2], None) if found else None
    if not dataclasses.is_dataclass(schema):
        return ""
    culprits = [o for o in overrides if re.search(rf"\b{found[1]}\s*[:=]", o)]
    where = f" in override {culprits[0]}" if culprits else ""
    return f"\n{found[1]!r}{where}: {found[2]} has {', '.join(f.name for f in dataclasses.fields(schema))}"


# Settings that change how a run is observed, kept or executed, not what it computes: out of the run name,
# so changing one resumes the run (README, "Run names", lists them).
UNHASHED = {
    "data": ("dir", "workers"),
    "model": ("activation_checkpointing",),
    "deepspeed": ("offload_optimizer", "offload_params"),  # like activation checkpointing: turned on to fit
    "train": ("log_every", "loader_workers", "faults", "checkpoint_every", "keep_checkpoints", "eval_every",
              "eval_batches", "max_skipped_in_row", "compile", "gc_every",
              # How the batch is split changes nothing computed: the tokens per step (hashed below) do.
              "micro_batch_size", "grad_accum_steps", "global_batch_tokens"),
}


def derive_run_name(cfg: dict) -> str:
    relevant = {k: cfg[k] for k in RESULT_KEYS}
    for group, keys in UNHASHED.items():
        relevant[group] = {k: v for k, v in cfg[group].items() if k not in keys}
    relevant["data"]["sources"] = hashed_specs(cfg["data"]["sources"])  # (relevant["data"] is a copy)
    # Workers x micro-batch x accumulation: 2 workers with 1 and 1 worker accumulating 2 train alike
    # (same samples per step), so a run continues on another number of workers (trainer/reshard.py).
    t = cfg["train"]
    relevant["batch_tokens"] = t["global_batch_tokens"] or (
        cfg["cluster"]["num_workers"] * t["micro_batch_size"] * (t["grad_accum_steps"] or 1) * cfg["data"]["seq_len"])
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:8]
    return f"{cfg['model']['name']}-{cfg['data']['name']}-{digest}"


def derive_batch(cfg: dict) -> None:
    """grad_accum_steps from train.global_batch_tokens, or a check that both agree."""
    t = cfg["train"]
    if t["global_batch_tokens"] is None:
        t["grad_accum_steps"] = t["grad_accum_steps"] or 1
        return
    per_micro_step = t["micro_batch_size"] * cfg["cluster"]["num_workers"] * cfg["data"]["seq_len"]
    accum, rest = divmod(t["global_batch_tokens"], per_micro_step)
    where = (
        f"train.global_batch_tokens={t['global_batch_tokens']:,} over train.micro_batch_size={t['micro_batch_size']} x "
        f"cluster.num_workers={cfg['cluster']['num_workers']} x data.seq_len={cfg['data']['seq_len']} "
        f"(= {per_micro_step:,} tokens per micro-step)"
    )
    if rest or accum == 0:
        raise ConfigError(f"invalid config:\n  {where}: does not divide; change one of them so it does")
    if t["grad_accum_steps"] is not None and t["grad_accum_steps"] != accum:
        raise ConfigError(f"invalid config:\n  train.grad_accum_steps={t['grad_accum_steps']}: {where} needs {accum}")
    t["grad_accum_steps"] = accum


def _samples_per_step(cfg: dict) -> str:
    c, t = cfg["cluster"], cfg["train"]
    return (f"{c['num_workers'] * t['micro_batch_size'] * t['grad_accum_steps']} samples per step (cluster.num_workers="
            f"{c['num_workers']} x train.micro_batch_size={t['micro_batch_size']} x {t['grad_accum_steps']} accumulated)")


def sizes_that_cannot_train(cfg: dict) -> list[int]:
    """Elastic group sizes among which the samples per step do not divide into whole micro-batches."""
    c = cfg["cluster"]
    if c["min_workers"] is None:
        return []
    micro_steps = c["num_workers"] * cfg["train"]["grad_accum_steps"]
    return [w for w in range(c["min_workers"], c["num_workers"] + 1) if micro_steps % w]


def _check_elastic(cfg: dict) -> None:
    """An elastic group keeps the samples per step at every size: the smallest must share them too.
    (Sizes in between that cannot are named when the run starts: Ray may still pick one.)"""
    c = cfg["cluster"]
    if c["min_workers"] in sizes_that_cannot_train(cfg):
        raise ConfigError(
            f"invalid config:\n  cluster.min_workers={c['min_workers']}: {_samples_per_step(cfg)} do not divide "
            f"into micro-batches on {c['min_workers']} workers; choose a min_workers that divides them"
        )


def elastic_note(cfg: dict) -> str | None:
    """What the driver says of an elastic group with sizes that cannot train."""
    odd = sizes_that_cannot_train(cfg)
    if not odd:
        return None
    return (f"[elmforge] elastic group of {cfg['cluster']['min_workers']}-{cfg['cluster']['num_workers']} workers: "
            f"{_samples_per_step(cfg)} do not divide among {', '.join(map(str, odd))}; a group Ray starts at such a "
            "size stops at once, as a failure (cluster.max_failures), until the cluster's room changes")


def accumulation_for(cfg: dict, world_size: int) -> int:
    """The accumulation that keeps the run's samples per step on `world_size` workers (an elastic group)."""
    if world_size in sizes_that_cannot_train(cfg):
        raise ValueError(f"Ray started {world_size} workers, and {_samples_per_step(cfg)} do not divide among them")
    return cfg["cluster"]["num_workers"] * cfg["train"]["grad_accum_steps"] // world_size


URI = r"^[A-Za-z][A-Za-z0-9+.-]*://"
PATH_KEYS = (("storage_path",), ("data", "dir"), ("run", "dir"), ("tokenizer", "path"), ("train", "init_from"))


def _refuse_uris(cfg: dict) -> None:
    """Paths must be POSIX paths: os.path.abspath would quietly turn s3://b/x into ./s3:/b/x."""
    paths = [(".".join(keys), cfg[keys[0]] if len(keys) == 1 else cfg[keys[0]][keys[1]]) for keys in PATH_KEYS]
    paths += [(f"data.sources.{i}.path", s.get("path")) for i, s in enumerate(cfg["data"]["sources"])]
    uris = []
    for key, value in paths:
        if isinstance(value, str) and not value.startswith(PACKAGE_SCHEME) and re.match(URI, value):
            uris.append(f"{key}={value}")
    if uris:
        raise ConfigError(f"{', '.join(uris)}: URIs are not supported; mount the storage on every node "
                          "(a shared file system, or a bucket through s3fs / gcsfuse) and give its path")


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def finalise(cfg: dict) -> dict:
    """Fill derived values and make every path absolute (Ray workers run elsewhere)."""
    _refuse_uris(cfg)
    cfg["storage_path"] = _absolute(cfg["storage_path"])
    if cfg["data"]["dir"] is None:
        cfg["data"]["dir"] = os.path.join(cfg["storage_path"], "data", cfg["data"]["name"])
    cfg["data"]["dir"] = _absolute(cfg["data"]["dir"])
    if cfg["run"]["name"] is None:
        cfg["run"]["name"] = derive_run_name(cfg)
    if cfg["run"]["dir"] is None:
        cfg["run"]["dir"] = os.path.join(cfg["storage_path"], "outputs", cfg["run"]["name"])
    cfg["run"]["dir"] = _absolute(cfg["run"]["dir"])
    for section, key in (("tokenizer", "path"), ("train", "init_from"), ("submit", "working_dir")):
        if cfg[section][key]:
            cfg[section][key] = _absolute(cfg[section][key])
    for source in cfg["data"]["sources"]:  # package:// stays: where the package lies differs between machines
        if source.get("path") and not source["path"].startswith(PACKAGE_SCHEME):
            source["path"] = _absolute(source["path"])
        _absolute_local_dataset(source)
    return cfg


def _absolute_local_dataset(source: dict) -> None:
    """An `hf` source's local paths made absolute, as `path` is (the Ray tasks that read them may run in
    another working directory): a dataset directory (`~/...`, or one that exists here, which `datasets`
    too prefers over a hub id of the same name), and the local files a packaged builder reads."""
    hf = source.get("hf") or ""
    if hf.startswith("~") or (os.path.isdir(hf) and not os.path.isabs(hf)):  # a hub id never starts with ~
        source["hf"] = _absolute(hf)
    files = source.get("hf_data_files")
    if hf in PACKAGED_BUILDERS and isinstance(files, str) and not re.match(URI, files):
        source["hf_data_files"] = _absolute(files)


def _plain_name(name: str) -> bool:
    """A name that becomes one directory under outputs/ or data/, not a path out of it."""
    return bool(name) and name == name.strip() and name not in (".", "..") and not set(name) & {"/", "\\"}


def validate(cfg: dict) -> None:
    """Checks the schema's types cannot express; all problems are reported at once."""
    errors = []

    def need(ok: bool, key: str, problem: str) -> None:
        if not ok:
            errors.append(f"{key}: {problem}")

    t, m, d, c = cfg["train"], cfg["model"], cfg["data"], cfg["cluster"]
    for key, name in (("run.name", cfg["run"]["name"]), ("data.name", d["name"])):
        need(_plain_name(name), f"{key}={name!r}", "must be a plain directory name: not empty, no / or \\, not . or ..")
    for key in ("max_steps", "micro_batch_size", "log_every", "keep_checkpoints", "eval_batches", "max_skipped_in_row"):
        need(t[key] >= 1, f"train.{key}={t[key]}", "must be at least 1")
    for key in ("grad_accum_steps", "checkpoint_every", "eval_every", "global_batch_tokens"):
        need(t[key] is None or t[key] >= 1, f"train.{key}={t[key]}", "must be at least 1 (or null)")
    need(0 <= t["warmup_steps"] <= t["max_steps"], f"train.warmup_steps={t['warmup_steps']}",
         f"must be in [0, train.max_steps={t['max_steps']}]: set it within (e.g. train.warmup_steps="
         f"{max(t['max_steps'], 0) // 4}) or raise train.max_steps")
    need(0 <= t["min_lr_ratio"] <= 1, f"train.min_lr_ratio={t['min_lr_ratio']}", "must be in [0, 1]")
    for key in ("lr", "eps"):  # inf passes `> 0` and trains on NaN
        need(math.isfinite(t[key]) and t[key] > 0, f"train.{key}={t[key]}", "must be a positive number")
    for key in ("warmup_init_lr", "weight_decay", "grad_clip", "z_loss_weight"):
        zero = " (0: none)" if key in ("grad_clip", "z_loss_weight", "weight_decay") else ""
        need(math.isfinite(t[key]) and t[key] >= 0, f"train.{key}={t[key]}", f"must be a number, 0 or more{zero}")
    need(len(t["betas"]) == 2 and all(0 <= b < 1 for b in t["betas"]), f"train.betas={t['betas']}", "must be two values in [0, 1)")
    for key in ("loader_workers", "gc_every", "seed"):
        need(t[key] >= 0, f"train.{key}={t[key]}", "must be 0 or more")
    z = cfg["deepspeed"]
    need(z["stage"] in (0, 1, 2, 3), f"deepspeed.stage={z['stage']}", "must be 0, 1, 2 or 3")
    need(not z["offload_optimizer"] or z["stage"] >= 1, "deepspeed.offload_optimizer", "needs deepspeed.stage 1, 2 or 3")
    need(not z["offload_params"] or z["stage"] == 3, "deepspeed.offload_params", "needs deepspeed.stage=3")
    # torch.compile traces ZeRO-3's partitioned (empty) parameters; DeepSpeed's own compiler is not wired in.
    need(not t["compile"] or z["stage"] < 3, "train.compile=true", "does not work with deepspeed.stage=3 (use 0-2)")
    need(
        z["communication_data_type"] in (None, "fp32", "bf16", "fp16"),
        f"deepspeed.communication_data_type={z['communication_data_type']}",
        "must be fp32, bf16 or fp16 (or null)",
    )
    if t["init_from"]:
        need(Path(t["init_from"], "config.json").is_file(), f"train.init_from={t['init_from']}",
             _not_a_hf_directory(Path(t["init_from"])))
    need(c["num_workers"] >= 1, f"cluster.num_workers={c['num_workers']}", "must be at least 1")
    log = cfg["logger"]
    if log["wandb"] and log["mode"] != "disabled":  # W&B's own limits: else found only once training starts
        project = log["project"]
        need(0 < len(project) <= 128 and not set(project) & set("/\\#?%:"),
             f"logger.project={project!r}", "must be 1 to 128 characters, none of / \\ # ? % :")
        for i, tag in enumerate(log["tags"]):
            need(0 < len(str(tag)) <= 64, f"logger.tags[{i}]", f"has {len(str(tag))} characters; W&B takes 1 to 64")
    faults, last = t["faults"], t["max_steps"]  # an injected fault that can never happen tests nothing
    for key in ("kill_rank", "nonfinite_rank"):  # (with no valid worker count, no rank to name)
        need(c["num_workers"] < 1 or 0 <= faults[key] < c["num_workers"], f"train.faults.{key}={faults[key]}",
             f"must be a rank of the run, 0 to {c['num_workers'] - 1} (ranks count from 0)")
    for key in ("kill_at_step", "kill_in_save_at_step", "sigterm_at_step"):
        need(faults[key] is None or 1 <= faults[key] <= last, f"train.faults.{key}={faults[key]}",
             f"must be a step of the run, 1 to train.max_steps={last}")
    need(all(1 <= s <= last for s in faults["nonfinite_at_steps"]), f"train.faults.nonfinite_at_steps="
         f"{faults['nonfinite_at_steps']}", f"must be steps of the run, 1 to train.max_steps={last}")
    if c["min_workers"] is not None:
        need(1 <= c["min_workers"] <= c["num_workers"], f"cluster.min_workers={c['min_workers']}",
             f"must be in [1, cluster.num_workers={c['num_workers']}]")
        need(c["launcher"] == "ray", f"cluster.min_workers={c['min_workers']}",
             "needs cluster.launcher=ray (Ray Train resizes the group; torchrun's world is fixed)")
    need(not c["dashboard"] or c["address"] is None, "cluster.dashboard=true",
         "starts a dashboard for an embedded Ray only (cluster.address null); a cluster's dashboard is its head's")
    need(c["cpus_per_worker"] > 0, f"cluster.cpus_per_worker={c['cpus_per_worker']}", "must be positive")
    need(c["num_cpus"] is None or c["num_cpus"] >= 1, f"cluster.num_cpus={c['num_cpus']}",
         "must be at least 1 (or null: this machine's cores)")
    need(c["max_failures"] >= -1, f"cluster.max_failures={c['max_failures']}", "must be 0 or more (or -1: no limit)")
    entry = cfg["submit"]["entrypoint_num_cpus"]
    need(math.isfinite(entry) and entry >= 0, f"submit.entrypoint_num_cpus={entry}", "must be 0 or more")
    p = cfg["prepare"]
    need(not (p["verify"] and (p["dry_run"] or p["force"])), "prepare.verify=true",
         "checks a built dataset and writes nothing: give it alone, not with prepare.dry_run or prepare.force")
    need(d["seq_len"] >= 1, f"data.seq_len={d['seq_len']}", "must be at least 1")
    need(0 <= d["val_fraction"] < 1, f"data.val_fraction={d['val_fraction']}", "must be in [0, 1)")
    for key in ("min_chars", "min_tokens"):
        need(d["filters"][key] >= 0, f"data.filters.{key}={d['filters'][key]}", "must be 0 or more")
    need(d["samples_per_shard"] >= 1, f"data.samples_per_shard={d['samples_per_shard']}", "must be at least 1")
    need(d["shard_bytes"] is None or d["shard_bytes"] > 0, f"data.shard_bytes={d['shard_bytes']}", "must be positive")
    need(d["target_tokens"] is None or d["target_tokens"] > 0, f"data.target_tokens={d['target_tokens']}", "must be positive")
    need(d["workers"] is None or d["workers"] >= 0, f"data.workers={d['workers']}", "must be 0 (no Ray) or more")
    need(len(d["sources"]) > 0, "data.sources", "needs at least one source")
    for i, src in enumerate(d["sources"]):
        need(bool(src["path"]) != bool(src["hf"]), f"data.sources[{i}]", "set exactly one of `path` (local files) or `hf`")
        need(src["weight"] >= 0, f"data.sources[{i}].weight={src['weight']}", "must be 0 or more")
        need(src["separator"] is None or (src["separator"] != "" and bool(src["path"])), f"data.sources[{i}].separator="
             f"{src['separator']!r}", "splits the .txt files of a `path` source: a non-empty string (null: a file is one document)")
    need(sum(src["weight"] for src in d["sources"]) > 0, "data.sources[*].weight", "at least one weight must be positive")
    need(
        d["seq_len"] <= min(m["max_context_length"], m["rope_max_length"]),
        f"data.seq_len={d['seq_len']}",
        f"exceeds the model's context (model.max_context_length={m['max_context_length']})",
    )
    need(
        m["vocab_size"] >= cfg["tokenizer"]["vocab_size"],
        f"model.vocab_size={m['vocab_size']}",
        f"is smaller than tokenizer.vocab_size={cfg['tokenizer']['vocab_size']}; token ids would overflow the embedding",
    )
    need(cfg["tokenizer"]["kind"] != "bpe" or not cfg["tokenizer"]["path"], f"tokenizer.path={cfg['tokenizer']['path']}",
         "is read by tokenizer=file (a tokenizer.json) or tokenizer=llama (a tokenizer.model); tokenizer=bpe, the "
         "default, trains one on the corpus: add tokenizer=file or tokenizer=llama")
    tok = cfg["tokenizer"]
    # A byte-level BPE starts from 256 byte tokens plus <unk>, <s> and </s>: fewer rows could not hold them.
    need(tok["kind"] != "bpe" or tok["vocab_size"] >= 259, f"tokenizer.vocab_size={tok['vocab_size']}",
         "must be at least 259 for tokenizer=bpe (256 byte tokens, <unk>, <s>, </s>)")
    need(tok["max_train_documents"] is None or tok["max_train_documents"] >= 1,
         f"tokenizer.max_train_documents={tok['max_train_documents']}", "must be at least 1 (or null: every document)")
    if cfg["tokenizer"]["kind"] != "bpe":
        path = cfg["tokenizer"]["path"]
        want = ("a Hugging Face tokenizer.json" if cfg["tokenizer"]["kind"] == "file"
                else "a SentencePiece .model file, such as LLaMA's tokenizer.model (the recipes' tokenizer)")
        need(bool(path) and Path(path).is_file(), f"tokenizer.path={path}",
             f"{'not found' if path else 'not set'}: give tokenizer.path=<path to {want}>")
    sizes = ("num_layers", "model_dim", "head_dim", "num_gqa_groups", "ffn_dim_divisor", "vocab_size",
             "max_context_length", "rope_max_length")
    for key in sizes:
        need(m[key] >= 1, f"model.{key}={m[key]}", "must be at least 1")
    need(m["head_dim"] % 2 == 0, f"model.head_dim={m['head_dim']}", "must be even (rotary embeddings turn pairs of dimensions)")
    if all(m[key] >= 1 for key in sizes):  # the layer plan of sizes that exist
        try:
            OpenELMConfig(**m).layer_plan()
        except (ValueError, TypeError) as e:
            errors.append(f"model: {e}")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def _not_a_hf_directory(path: Path) -> str:
    """What train.init_from points at instead of a Hugging Face directory, and what to give."""
    export = {"COMPLETE": ("a training checkpoint", "--checkpoint <it>"), "checkpoints": ("a run directory", "run.name=<its name>")}
    for marker, (what, which) in export.items():
        if (path / marker).exists():
            return f"is {what}, not a Hugging Face directory: export it first (elmforge export {which} --out <dir>)"
    where = "does not exist" if not path.exists() else "holds no config.json"
    return (f"{where}: must be a Hugging Face directory with config.json (a run that has a checkpoint resumes "
            "without it: leave train.init_from out and keep its run.name)")


def compose_config(overrides: list[str] = ()) -> dict:
    cfg = compose_unchecked(overrides)
    check_and_derive(cfg)
    return cfg


def compose_unchecked(overrides: list[str] = ()) -> dict:
    """The composed config, finalised: types checked by the schema, values not yet."""
    raw = compose_raw(overrides)
    try:
        cfg = OmegaConf.to_container(raw, resolve=True, throw_on_missing=True, enum_to_str=True)
    except MissingMandatoryValue as e:
        group = e.full_key.split(".")[0]
        has_options = group in GROUPS
        where = f" or in the {group}= option's file (conf/{group}/<name>.yaml)" if has_options else ""
        raise ConfigError(f"{e.full_key}: no value; set {e.full_key}=... on the command line{where}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e)) from None
    added = _keys_not_in_schema(cfg, ElmConfig)
    if added:  # `+key=value` adds a key the struct config would refuse: a misspelt one would be ignored
        raise ConfigError(f"{', '.join(added)}: not a config key (a `+` adds keys, but only the schema's are read); "
                          "check the spelling with `--cfg job`")
    return finalise(cfg)


def _keys_not_in_schema(cfg: dict, schema, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(schema)
    unknown = []
    for key, value in cfg.items():
        if key not in hints:
            unknown.append(prefix + key)
            continue
        kind = next((a for a in typing.get_args(hints[key]) if a is not type(None)), hints[key])  # Optional[X], list[X]: X
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            unknown += _keys_not_in_schema(value, kind, f"{prefix}{key}.")
        elif dataclasses.is_dataclass(kind) and isinstance(value, list):  # data.sources
            for i, entry in enumerate(value):
                unknown += _keys_not_in_schema(entry, kind, f"{prefix}{key}.{i}.") if isinstance(entry, dict) else []
    return unknown


def check_and_derive(cfg: dict) -> None:
    """Every check and derived value of a finalised config (a composed one, or a sweep trial's)."""
    validate(cfg)
    derive_batch(cfg)
    _check_elastic(cfg)


def to_yaml(cfg: dict) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(cfg))

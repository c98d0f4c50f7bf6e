"""A sweep trial's config: the sweep's config with the trial's sampled values (each as the schema takes
it) and the trial's own run name, run dir and W&B group. Ray- and torch-free, for the command line."""

import copy
from enum import Enum
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cluster.config import ConfigError, check_and_derive, compose_unchecked
from cluster.config_schema import ElmConfig


def compose_sweep_base(overrides: list[str]) -> dict:
    """A sweep's config, checked as its trials will train: every trial replaces the values of the searched
    keys, so those are checked at a value the space can draw (the first choice, the low bound), not at the
    base's (a base train.warmup_steps above a searched train.max_steps is no error). Each drawable value is
    checked in turn before Ray starts (sweep.check_space), which also explains a malformed space."""
    cfg = compose_unchecked(overrides)
    if not cfg["sweep"]:
        raise ConfigError("sweep=<name> is required: a search space in conf/sweep/ (e.g. sweep=lr_tiny)")
    space = cfg["sweep"].get("space") or {}
    apply(cfg, dict.fromkeys(space), typed=False)  # names a key that is not the config's
    drawn = {}
    for key, spec in space.items():
        value = _first_draw(spec)
        if value is None:  # a malformed spec: check_space says what is wrong with it
            continue
        try:
            cfg = apply(cfg, {key: value})
            drawn[key] = value
        except ConfigError:
            pass  # a value the key cannot take: check_space names it, as a value of the space
    try:
        check_and_derive(cfg)
    except ConfigError as e:
        if not drawn:
            raise
        problems = str(e).removeprefix("invalid config:").lstrip("\n")
        at = ", ".join(f"{key}={value}" for key, value in drawn.items())
        raise ConfigError(f"invalid config, with searched keys at values sweep.space draws ({at}):\n"
                          f"{problems}") from None
    return cfg


def _first_draw(spec):
    """A value the spec can draw, or None for a malformed one."""
    if not isinstance(spec, dict):
        return None
    if spec.get("type") == "choice":
        values = spec.get("values")
        return values[0] if isinstance(values, list) and values else None
    return spec.get("low")


def apply(cfg: dict, params: dict, typed: bool = True) -> dict:
    """A copy of cfg with dotted keys set, each value as the schema takes it (typed=False: keys only);
    unknown keys are an error naming them, values of the wrong type an invalid config."""
    cfg = copy.deepcopy(cfg)
    for dotted, value in params.items():
        *parents, last = dotted.split(".")
        node = cfg
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or last not in node:
            raise ConfigError(f"sweep.space: {dotted} is not a config key")
        if isinstance(node[last], dict):
            raise ConfigError(f"sweep.space: {dotted} is a section, not a value; search its keys ({dotted}.<key>)")
        node[last] = as_the_schema_takes(dotted, value) if typed else value
    return cfg


def as_the_schema_takes(dotted: str, value):
    """The value through the config schema's type for the key (an integer key refuses 5.8, an enum one a
    name not among its members), as a command-line override would go: a trial's config is a plain dict."""
    schema = OmegaConf.structured(ElmConfig)
    try:
        OmegaConf.update(schema, dotted, value, merge=False)
        taken = OmegaConf.select(schema, dotted)
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid config:\n  {dotted}={value!r}: {str(e).splitlines()[0]}") from None
    if isinstance(taken, Enum):
        return taken.name
    return OmegaConf.to_container(taken) if isinstance(taken, (DictConfig, ListConfig)) else taken


def sweep_dir(cfg: dict) -> Path:
    return Path(cfg["storage_path"], "sweeps", cfg["sweep"]["name"])


def trial_config(cfg: dict, params: dict, trial_name: str) -> dict:
    trial = apply(cfg, params)
    trial["run"]["name"] = trial_name
    trial["run"]["dir"] = str(sweep_dir(cfg) / trial_name)
    trial["logger"]["group"] = cfg["logger"]["group"] or cfg["sweep"]["name"]  # one W&B run per trial, grouped
    if trial["train"]["global_batch_tokens"]:  # re-derived below, for the trial's own micro-batch
        trial["train"]["grad_accum_steps"] = None
    check_and_derive(trial)
    return trial

"""A run resumes on the data it trained on, or not at all.

A dataset is rebuilt in place when its settings or inputs change (data_pipelines/prepare.py), and
a checkpoint's loader state counts positions in the shards it read. Resumed on other shards, a run
would go on silently with other data than the uninterrupted run's. Two checks refuse that:
before prepare, the launch's data settings and inputs against those the newest checkpoint was
trained on (so that such a launch does not rebuild, and so lose, the run's dataset), and at
resume, the dataset's fingerprint against the one the checkpoint recorded (say, another run's
launch rebuilt it with its own settings under the same data.name).
"""

from pathlib import Path

from data_pipelines.prepare import build_settings, dataset_fingerprint
from trainer.checkpoint import latest_checkpoint, read_client_state

NEW_RUN = "or start a new run.name (train.init_from=<an export of this run> starts it from these weights)"


def check_run_data(cfg: dict) -> str | None:
    """Before preparing the data: refuse data settings, or inputs, other than those the run's newest
    checkpoint was trained on. Returns the fingerprint of the data this launch asks for when it
    computed one (it reads every local input file: prepare takes it rather than reading them again)."""
    checkpoint = latest_checkpoint(Path(cfg["run"]["dir"], "checkpoints"))
    if checkpoint is None:
        return None
    state = read_client_state(checkpoint)
    saved = state["config"]
    before = build_settings(saved["data"], saved["tokenizer"])
    now = build_settings(cfg["data"], cfg["tokenizer"])
    changed = [key for key in before if before[key] != now.get(key)]
    intro = f"run {cfg['run']['name']} resumes from {checkpoint.name} on the data it trained on, but"
    if changed:
        diffs = ", ".join(f"{key}={now.get(key)!r} (it trained with {before[key]!r})" for key in changed)
        raise ValueError(f"{intro} this launch asks for other data: {diffs}. Launch it with its own data settings, "
                         f"{NEW_RUN}; nothing was changed")
    trained_on = state.get("dataset_fingerprint")
    if not trained_on:  # a checkpoint from before this record
        return None
    fingerprint = dataset_fingerprint(cfg["data"], cfg["tokenizer"])
    if fingerprint != trained_on:
        raise ValueError(f"{intro} its input files have changed since (fingerprint {trained_on[:12]}, now "
                         f"{fingerprint[:12]}), and preparing would rebuild {cfg['data']['dir']} from them. Restore "
                         f"the inputs it trained on, {NEW_RUN}; nothing was changed")
    return fingerprint


def check_dataset_unchanged(state: dict, checkpoint: Path, manifest) -> None:
    """At resume: the dataset must be the one the checkpoint's loader state counts in."""
    trained_on, now = state.get("dataset_fingerprint"), manifest.fingerprint
    if trained_on and now and trained_on != now:  # None: a checkpoint (or dataset) from before this record
        raise ValueError(
            f"checkpoint {checkpoint} was trained on the dataset in {manifest.root} as it was built then "
            f"(fingerprint {trained_on[:12]}); it has been rebuilt since from other inputs or settings "
            f"({now[:12]}), and resuming would read other data. Rebuild it from the inputs and settings the run "
            f"trained on, {NEW_RUN}"
        )


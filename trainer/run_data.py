"""A run resumes on the data it trained on, or not at all.

A dataset is rebuilt in place when its settings or inputs change (data_pipelines/prepare.py), and
a checkpoint's loader state counts positions in the shards it read. Resumed on other shards, a run
would go on silently with other data than the uninterrupted run's. Two checks refuse that:
before prepare, the launch's data settings against those the newest checkpoint was trained with
(so a launch with other settings does not rebuild, and so lose, the run's dataset), and at resume,
the dataset's fingerprint against the one the checkpoint recorded (inputs changed since, or
another launch rebuilt the dataset with its own settings).
"""

from pathlib import Path

from data_pipelines.prepare import build_settings
from trainer.checkpoint import latest_checkpoint, read_client_state

NEW_RUN = "or start a new run.name (train.init_from=<an export of this run> starts it from these weights)"


def check_data_settings(cfg: dict) -> None:
    """Before preparing the data: refuse data settings other than those the run's newest checkpoint
    was trained with, naming each."""
    checkpoint = latest_checkpoint(Path(cfg["run"]["dir"], "checkpoints"))
    if checkpoint is None:
        return
    saved = read_client_state(checkpoint)["config"]
    before = build_settings(saved["data"], saved["tokenizer"])
    now = build_settings(cfg["data"], cfg["tokenizer"])
    changed = [key for key in before if before[key] != now.get(key)]
    if changed:
        diffs = ", ".join(f"{key}={now.get(key)!r} (it trained with {before[key]!r})" for key in changed)
        raise ValueError(
            f"run {cfg['run']['name']} resumes from {checkpoint.name} on the data it trained on, but this launch "
            f"asks for other data: {diffs}. Launch it with its own data settings, {NEW_RUN}; nothing was changed"
        )


def check_dataset_unchanged(state: dict, checkpoint: Path, manifest) -> None:
    """At resume: the dataset must be the one the checkpoint's loader state counts in."""
    trained_on, now = state.get("dataset_fingerprint"), dataset_fingerprint_of(manifest)
    if trained_on and now and trained_on != now:  # None: a checkpoint (or dataset) from before this record
        raise ValueError(
            f"checkpoint {checkpoint} was trained on the dataset in {manifest.root} as it was built then "
            f"(fingerprint {trained_on[:12]}); it has been rebuilt since from other inputs or settings "
            f"({now[:12]}), and resuming would read other data. Rebuild it from the inputs and settings the run "
            f"trained on, {NEW_RUN}"
        )


def dataset_fingerprint_of(manifest) -> str | None:
    """The fingerprint prepare recorded for a built dataset (its inputs, settings and tokenizer)."""
    return manifest.data.get("source", {}).get("fingerprint")

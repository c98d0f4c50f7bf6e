"""Which directories are checkpoints, and which the pruning keeps."""

from trainer.checkpoint import COMPLETE, _prune, checkpoint_dirs, latest_checkpoint


def _make(root, name, complete=True):
    (root / name).mkdir(parents=True)
    (root / name / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (root / name / COMPLETE).write_text("{}\n")


def test_a_users_copy_beside_the_checkpoints_is_neither_resumed_from_nor_pruned(tmp_path):
    for name in ("step_2", "step_4", "step_6", "step_6_backup", "step_10_keep"):
        _make(tmp_path, name)
    _make(tmp_path, "step_8", complete=False)  # a crashed save, newer than the newest complete one
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_2", "step_4", "step_6", "step_8"]
    assert latest_checkpoint(tmp_path).name == "step_6"

    _prune(tmp_path, keep=2)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["step_10_keep", "step_4", "step_6", "step_6_backup", "step_8"]  # step_8 may still be written

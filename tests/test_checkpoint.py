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


def _digests_on_two_ranks(checkpoint: str) -> dict:
    from pathlib import Path

    from trainer.checkpoint_digests import _files, _my_share, damage, record_digests
    from trainer.distributed import init_distributed

    init_distributed(use_gpu=False)
    recorded = record_digests(Path(checkpoint))
    return {"share": _my_share(_files(Path(checkpoint))), "digests": recorded,
            "damage": damage(Path(checkpoint), recorded)}


def test_ranks_hash_shares_of_the_checkpoint_balanced_by_size(tmp_path):
    import hashlib

    from distributed import run_ranks

    # ZeRO-1/2: one model-states file as large as the optimizer shards together.
    sizes = {"mp_rank_00_model_states.pt": 3000, **{f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt": 1000
                                                    for r in range(3)}}
    for i, (name, size) in enumerate(sizes.items()):
        (tmp_path / name).write_bytes(bytes([i]) * size)
    (tmp_path / COMPLETE).write_text("{}\n")  # the marker itself is not hashed
    ranks = run_ranks(2, _digests_on_two_ranks, str(tmp_path))
    shares = [set(r["share"]) for r in ranks]
    assert shares[0] | shares[1] == set(sizes) and not shares[0] & shares[1]
    assert [sum(sizes[n] for n in share) for share in shares] == [3000, 3000]
    expected = {n: {"bytes": s, "sha256": hashlib.sha256((tmp_path / n).read_bytes()).hexdigest()}
                for n, s in sizes.items()}
    assert ranks[0]["digests"] == ranks[1]["digests"] == expected
    assert ranks[0]["damage"] is ranks[1]["damage"] is None


def test_a_marker_cut_short_is_named_not_taken_for_one_without_digests(tmp_path):
    import json

    import pytest

    from trainer.checkpoint import require_complete

    checkpoint = tmp_path / "step_5"
    checkpoint.mkdir()
    (checkpoint / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
    marker = json.dumps({"step": 5, "files": {"mp_rank_00_model_states.pt": {"bytes": 100, "sha256": "0" * 64}}})
    (checkpoint / COMPLETE).write_text(marker[: len(marker) // 2])
    with pytest.raises(ValueError, match=r"step_5 cannot be read \(its COMPLETE marker is not the JSON a save writes"):
        require_complete(checkpoint)
    (checkpoint / COMPLETE).write_text('{"step": 5}\n')  # saved before digests were recorded: loads unchecked
    assert require_complete(checkpoint) == checkpoint


class _TwoGPUsSeen:
    """torch.cuda as a rank sees it on a GPU node (none here): two devices, the second its own."""

    def __init__(self, devices: int = 2, current: int = 1):
        import torch

        self.states = [torch.full((16,), i, dtype=torch.uint8) for i in range(devices)]
        self.current = current

    def apply(self, monkeypatch):
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": self.states[self.current].clone())
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in self.states])

        def set_state(state, device="cuda"):
            self.states[self.current] = state.clone()

        def set_all(states):  # as torch does: by position, for every device given
            for i, state in enumerate(states):
                self.states[i] = state.clone()  # IndexError past this process's devices

        monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)


def test_the_cuda_rng_kept_is_the_ranks_own_device_so_a_resume_may_see_fewer_gpus(monkeypatch):
    # A run saved where a rank saw 2 GPUs resumes where it sees 1 (fewer workers per node, torchrun to one
    # GPU): restoring every device's state by position failed there with an IndexError, on every rank.
    import torch

    from trainer.checkpoint import rng_state, set_rng_state

    saving = _TwoGPUsSeen(devices=2, current=1)
    saving.apply(monkeypatch)
    state = rng_state()
    assert torch.equal(state["cuda"], saving.states[1])
    resuming = _TwoGPUsSeen(devices=1, current=0)
    resuming.apply(monkeypatch)
    set_rng_state(state)
    assert torch.equal(resuming.states[0], saving.states[1])
    # A checkpoint from before, with every visible device's state: the rank's own device's is taken.
    old = {**state, "cuda": [torch.full((16,), 7, dtype=torch.uint8), torch.full((16,), 9, dtype=torch.uint8)]}
    second_gpu = _TwoGPUsSeen(devices=2, current=1)
    second_gpu.apply(monkeypatch)
    set_rng_state(old)
    assert torch.equal(second_gpu.states[1], old["cuda"][1]) and torch.equal(second_gpu.states[0], torch.zeros(16))

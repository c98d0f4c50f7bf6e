"""`elmforge train` end to end: prepare, embedded Ray, 2 Ray Train workers, DeepSpeed ZeRO-2, W&B offline."""

import json
import math
import subprocess
import sys

import pytest

from trainer.summary import read_summary
from wandb_offline import run_summary

pytestmark = pytest.mark.integration


def test_elmforge_train_demo_end_to_end(tmp_path):
    cmd = [sys.executable, "-m", "cluster.cli", "train", f"storage_path={tmp_path}", "train.max_steps=12",
           "train.warmup_steps=3", "train.log_every=1", "run.name=e2e"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "2 ranks, ZeRO-2, fp32, 12 steps" in out

    run_dir = tmp_path / "outputs" / "e2e"
    summary = read_summary(run_dir)
    losses = summary["losses"]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    for key in ("shards", "checkpoint", "metrics", "W&B run"):
        assert key in proc.stdout, key

    # Both ranks wrote their ZeRO-2 optimizer partition; rank 0 marked it complete.
    ckpt = run_dir / "checkpoints" / "step_12"
    assert (ckpt / "COMPLETE").is_file()
    assert len(list(ckpt.glob("*zero_pp_rank_*_optim_states.pt"))) == 2

    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["loss"] for r in records] == losses

    wb = run_summary(summary["wandb_dir"])
    assert wb["state"] == "finished" and wb["summary"]["final_loss"] == pytest.approx(losses[-1])
    assert wb["config"]["cluster"]["num_workers"] == 2

    manifest = json.loads((tmp_path / "data" / "sample" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] > 1000

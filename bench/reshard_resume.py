"""What resuming on another number of ranks costs, against resuming on the same number.

A ZeRO-2 checkpoint of the model is saved by 2 gloo ranks after one training step. Then, each in
fresh processes: the baseline loads it on 2 ranks as saved; the other path converts it to
DeepSpeed's universal form (rank 0, trainer/reshard.py) and loads that on 1 rank. Engines are
built before the clocks start; the table gives the seconds of each part, the ratio of the whole
resharded resume to the baseline's load, and the checkpoint's and its universal form's sizes.

    .venv/bin/python bench/reshard_resume.py --model openelm_270m
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from shared import ROOT, cpu_name

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the gloo rank launcher the equivalence tests use

from distributed import run_ranks  # noqa: E402


def _cfg(model: str, world_size: int) -> dict:
    from cluster.config import compose_config

    return compose_config([f"model={model}", "deepspeed=zero2", "logger=none", "cluster.launcher=local",
                           f"cluster.num_workers={world_size}", "train.micro_batch_size=1",
                           f"train.grad_accum_steps={2 // world_size}"])


def _engine(cfg: dict, load_universal: bool = False):
    from trainer.distributed import init_distributed
    from trainer.model import build_model
    from trainer.train_loop import build_engine, model_config

    env = init_distributed(False)
    engine, _ = build_engine(cfg, build_model(model_config(cfg), seed=0), env, load_universal=load_universal)
    return engine, env


def save(model: str, root: str) -> None:
    import torch

    from trainer.checkpoint import save_checkpoint

    engine, env = _engine(_cfg(model, 2))
    tokens = torch.randint(0, 1000, (1, 129))
    loss = engine(tokens[:, :-1]).float().logsumexp(-1).mean()  # any loss: Adam needs a step's state
    engine.backward(loss)
    engine.step()
    save_checkpoint(engine, root, 1, {"step": 1}, env.is_main, keep=1)


def load_as_saved(model: str, root: str) -> float:
    from trainer.checkpoint import load_checkpoint

    engine, _ = _engine(_cfg(model, 2))
    start = time.perf_counter()
    load_checkpoint(engine, Path(root, "step_1"))
    return time.perf_counter() - start


def convert(root: str) -> float:
    from trainer.distributed import init_distributed
    from trainer.reshard import universal_checkpoint

    env = init_distributed(False)
    return universal_checkpoint(Path(root, "step_1"), 2, env.is_main)[1]


def load_universal(model: str, root: str) -> float:
    from trainer.reshard import UNIVERSAL, load_universal

    engine, _ = _engine(_cfg(model, 1), load_universal=True)
    start = time.perf_counter()
    load_universal(engine, Path(root, "step_1", UNIVERSAL))
    return time.perf_counter() - start


def _size_gb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="openelm_270m", help="a conf/model name")
    parser.add_argument("--dir", default=None, help="where the checkpoint goes (default: a temporary directory)")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    root = Path(args.dir or tempfile.mkdtemp(prefix="reshard-bench-"))
    try:
        run_ranks(2, save, args.model, str(root))
        same = max(run_ranks(2, load_as_saved, args.model, str(root)))
        conversion = run_ranks(1, convert, str(root))[0]
        universal = run_ranks(1, load_universal, args.model, str(root))[0]
        step = root / "step_1"
        sizes = {"checkpoint_gb": _size_gb(step) - _size_gb(step / "universal"), "universal_gb": _size_gb(step / "universal")}
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    figures = {"model": args.model, "cpu": cpu_name(), "load_as_saved_2_ranks_s": same, "convert_s": conversion,
               "load_universal_1_rank_s": universal, "ratio": (conversion + universal) / same, **sizes}
    print(f"{args.model}, ZeRO-2 fp32, {cpu_name()}")
    print("| resume | seconds |\n|---|---|")
    print(f"| as saved: load on 2 ranks | {same:.2f} |")
    print(f"| on 1 rank: convert (rank 0) | {conversion:.2f} |")
    print(f"| on 1 rank: load the universal form | {universal:.2f} |")
    print(f"| on 1 rank, in all / as saved | {figures['ratio']:.2f}x |")
    print(f"checkpoint {sizes['checkpoint_gb']:.2f} GB, universal form {sizes['universal_gb']:.2f} GB")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""The `elmforge` command line: `elmforge <verb> [key=value ...] [flags]`.

Each verb parses its few flags, composes the Hydra config from the overrides,
validates it as a whole, and only then starts work.
"""

import argparse
import os
import sys

from cluster import commands
from cluster.config import ConfigError, compose_config, to_yaml

VERBS = {
    "prepare": "tokenize the configured sources into WebDataset shards + manifest.json",
    "train": "prepare the data if needed, then train (Ray Train workers, or torchrun / this process)",
    "export": "write a run's checkpoint (or the average of its last K) as a Hugging Face directory",
    "eval": "loss and perplexity of a checkpoint or Hugging Face directory on the val split or text files",
    "generate": "continue a prompt with a checkpoint or Hugging Face directory",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elmforge",
        description="Train OpenELM-style models. Configuration is Hydra overrides: key=value or group=option.",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="verb")
    for verb, help_text in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        if verb in ("eval", "generate"):
            p.add_argument("path", help="a Hugging Face directory or run.dir/checkpoints/step_N")
        p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=openelm_270m cluster.num_workers=4")
        p.add_argument("--cfg", choices=["job"], help="print the composed config and exit")
    export = sub.choices["export"]
    export.add_argument("--checkpoint", nargs="+", help="checkpoint directories (default: the run's newest)")
    export.add_argument("--average", type=int, default=1, help="average the run's last K checkpoints (OpenELM: 5)")
    export.add_argument("--out", help="output directory (default: run.dir/hf)")
    ev = sub.choices["eval"]
    ev.add_argument("--text", help="a .txt/.jsonl file or glob to score instead of the val split")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--max-batches", type=int)
    ev.add_argument("--seq-len", type=int, help="with --text (default: data.seq_len)")
    gen = sub.choices["generate"]
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--greedy", action="store_true")
    gen.add_argument("--seed", type=int)
    return parser


def _implicit_overrides(args) -> list[str]:
    """Under torchrun the world size is torchrun's, unless the user said otherwise."""
    if commands.launched_by_torchrun() and not any(o.startswith("cluster.num_workers=") for o in args.overrides):
        return [f"cluster.num_workers={os.environ['WORLD_SIZE']}"]
    return []


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = compose_config(args.overrides + _implicit_overrides(args))
    except ConfigError as e:
        print(f"elmforge {args.verb}: config error\n{e}", file=sys.stderr)
        return 2
    if args.cfg == "job":
        print(to_yaml(cfg), end="")
        return 0
    try:
        getattr(commands, f"cmd_{args.verb}")(cfg, args)
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear message, no traceback
        if os.environ.get("ELMFORGE_DEBUG"):
            raise
        print(f"elmforge {args.verb}: {e}\n(set ELMFORGE_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `elmforge` command line: `elmforge <verb> [key=value ...] [--cfg job]`.

Each verb parses its few flags, composes the Hydra config from the overrides,
validates it as a whole, and only then starts work.
"""

import argparse
import os
import sys

from cluster.config import ConfigError, compose_config, to_yaml

VERBS = {
    "prepare": "tokenize the configured sources into WebDataset shards + manifest.json",
    "train": "prepare the data if needed, then train on Ray Train workers with DeepSpeed",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elmforge",
        description="Train OpenELM-style models. Configuration is Hydra overrides: key=value or group=option.",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="verb")
    for verb, help_text in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=openelm_270m cluster.num_workers=4")
        p.add_argument("--cfg", choices=["job"], help="print the composed config and exit")
    return parser


def _prepare(cfg: dict):
    from data_pipelines.prepare import prepare

    if cfg["data"]["workers"] != 0:  # tokenizer actors run on the configured Ray cluster
        from cluster.ray_runtime import connect

        connect(cfg["cluster"])
    return prepare(cfg["data"], cfg["tokenizer"], force=cfg["prepare"]["force"])


def cmd_prepare(cfg: dict):
    from data_pipelines.integrity import verify_dataset
    from data_pipelines.prepare import describe_plan

    options = cfg["prepare"]
    if options["dry_run"]:
        print(describe_plan(cfg["data"], cfg["tokenizer"]))
        return None
    if options["verify"]:
        verify_dataset(cfg["data"]["dir"])
        return cfg["data"]["dir"]
    return _prepare(cfg)


def cmd_train(cfg: dict) -> None:
    from cluster.launch import launch_training

    data_dir = _prepare(cfg)
    result = launch_training(cfg)
    print("\n[elmforge] training finished")
    print(f"  final loss   {result['final_loss']:.4f}")
    print(f"  shards       {data_dir}")
    print(f"  checkpoint   {result['checkpoint']}")
    print(f"  metrics      {result['metrics']}")
    if result.get("wandb_dir"):
        print(f"  W&B run      {result['wandb_dir']}")
        if cfg["logger"]["mode"] == "offline":
            print(f"  upload with  wandb sync {result['wandb_dir']}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = compose_config(args.overrides)
    except ConfigError as e:
        print(f"elmforge {args.verb}: config error\n{e}", file=sys.stderr)
        return 2
    if args.cfg == "job":
        print(to_yaml(cfg), end="")
        return 0
    try:
        {"prepare": cmd_prepare, "train": cmd_train}[args.verb](cfg)
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear message, no traceback
        if os.environ.get("ELMFORGE_DEBUG"):
            raise
        print(f"elmforge {args.verb}: {e}\n(set ELMFORGE_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `elmforge` command line: `elmforge <verb> [key=value ...] [flags]`.

Each verb parses its few flags, composes the Hydra config from the overrides,
validates it as a whole, and only then starts work.
"""

import argparse
import glob
import math
import os
import sys

# Ray folds lines from different processes that differ only in their numbers into one, "[repeated 2x
# across cluster]": the progress lines of a sweep's trials are such lines, and all but one trial's would
# vanish. Ray reads this once, when imported, so it is set here, before any verb imports Ray.
os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", r"^\[[a-z][\w ]*\] ")

from cluster import commands  # noqa: E402
from cluster.config import ConfigError, compose_config, is_override, to_yaml  # noqa: E402
from cluster.submit import ClusterUnreachable, SubmitError  # noqa: E402
from trainer.errors import TrainingError  # noqa: E402

VERBS = {
    "prepare": "tokenize the configured sources into WebDataset shards + manifest.json",
    "train": "prepare the data if needed, then train (Ray Train workers, or torchrun / this process)",
    "export": "write a run's checkpoint (or the average of its last K) as a Hugging Face directory",
    "eval": "loss and perplexity of a checkpoint or Hugging Face directory on the val split or text files",
    "generate": "continue a prompt with a checkpoint or Hugging Face directory",
    "sweep": "search hyperparameters with Ray Tune (sweep=<name>), ASHA stopping weak trials early",
    "submit": "send the training job to a Ray cluster through the Ray Jobs API (submit.address or RAY_ADDRESS)",
    "jobs": "list submitted jobs, or show the status or logs of one, or stop it",
    "report": "charts and one self-contained HTML page comparing runs, or a sweep's trials",
}
JOB_ACTIONS = ["list", "status", "logs", "stop"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elmforge",
        description="Train OpenELM-style models. Configuration is Hydra overrides: key=value or group=option.",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="verb")
    for verb, help_text in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        if verb == "report":  # reads a run's files only: no Hydra config, no overrides
            continue
        if verb in ("eval", "generate"):
            # Optional here so that main names the missing path alone (argparse would call the overrides required too).
            p.add_argument("path", nargs="?", help="a Hugging Face directory or run.dir/checkpoints/step_N")
            p.add_argument("--tokenizer", help="tokenizer.json or a SentencePiece .model (default: beside the "
                                               "model, or the run's dataset)")
        if verb == "jobs":
            # Optional here so that main names a missing action (argparse would call the overrides required too).
            p.add_argument("action", nargs="?", choices=JOB_ACTIONS)
            p.add_argument("job_id", nargs="?", help="the job id submit printed")
        p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=openelm_270m cluster.num_workers=4")
        p.add_argument("--cfg", choices=["job"], help="print the composed config and exit")
    export = sub.choices["export"]
    which = export.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", nargs="+",
                       help="checkpoint directories, averaged when several (default: the run's newest)")
    which.add_argument("--average", type=_positive(int), default=1,
                       help="average the run's last K checkpoints (OpenELM: 5)")
    export.add_argument("--out", help="output directory (default: run.dir/hf, or with --checkpoint its run's hf/)")
    ev = sub.choices["eval"]
    ev.add_argument("--text", nargs="+", help="files or globs to score instead of the val split: .txt, .jsonl, "
                                              ".json (JSON lines), .parquet, also .gz/.zst compressed")
    ev.add_argument("--text-field", default="text", help="with --text: the JSON field or parquet column holding "
                                                         "the text (default: text)")
    ev.add_argument("--separator", help="with --text: documents in .txt files end at this string, as a data "
                                        "source's separator (e.g. '<|endoftext|>'; default: a file is one document)")
    ev.add_argument("--batch-size", type=_positive(int), default=8, help="samples per forward (default: 8)")
    ev.add_argument("--max-batches", type=_positive(int), help="score at most this many batches (default: all)")
    ev.add_argument("--seq-len", type=_positive(int), help="with --text (default: the length a checkpoint trained "
                                                       "at; data.seq_len for a Hugging Face directory)")
    gen = sub.choices["generate"]
    gen.add_argument("--prompt", help="the text to continue (required)")
    gen.add_argument("--max-new-tokens", type=_positive(int), default=64, help="tokens to add (default: 64)")
    gen.add_argument("--temperature", type=_positive(float), help="sampling temperature (default 1.0)")
    gen.add_argument("--top-k", type=_positive(int), help="sample among the k most likely tokens")
    gen.add_argument("--greedy", action="store_true", help="always the most likely token")
    gen.add_argument("--seed", type=int, help="makes sampling repeatable (default: a fresh draw each time)")
    rep = sub.choices["report"]
    rep.add_argument("paths", nargs="+", help="run dirs, or dirs holding run dirs up to three levels down (a sweep dir, "
                     "storage_path)")
    rep.add_argument("--out", default="report", help="output directory (default: ./report)")
    sub.choices["submit"].add_argument("--wait", action="store_true", help="follow the job; exit non-zero if it fails")
    jobs = sub.choices["jobs"]
    jobs.add_argument("--follow", action="store_true", help="with logs: follow until the job ends")
    jobs.usage = "%(prog)s {" + ",".join(JOB_ACTIONS) + "} [job_id] [key=value ...] [--follow] [--cfg job]"
    parser.verb_parsers = sub.choices  # for errors that show a verb's own usage
    return parser


def _positive(kind):
    """An argparse type: a number of `kind` above zero."""

    def parse(text: str):
        value = kind(text)
        if not 0 < value < math.inf:  # nan and inf too
            raise argparse.ArgumentTypeError(f"must be {'finite and ' if kind is float else ''}> 0, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"  # argparse names the type in its error
    return parse


def _implicit_overrides(args) -> list[str]:
    """Under torchrun the world size is torchrun's and the launch Ray-free (what run_config.json records),
    unless the user said otherwise."""
    if not commands.launched_by_torchrun():
        return []
    given = {o.split("=", 1)[0].lstrip("+") for o in args.overrides}
    implied = {"cluster.num_workers": os.environ["WORLD_SIZE"], "cluster.launcher": "local"}
    return [f"{key}={value}" for key, value in implied.items() if key not in given]


def _report(args) -> None:
    from cluster.report import build_report

    written = build_report(args.paths, args.out)
    charts = [k for k in written if k != "html"]
    print(f"[report] {written['html']} ({len(charts)} charts: {', '.join(charts) or 'none yet'})")


def _disconnect_ray() -> None:
    """Ray holds back lines its workers repeat ("[repeated 2x across cluster]", their tracebacks among
    them) and prints them when it disconnects: that should come before the one-line error, not after."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _run(verb: str, fn, *fn_args) -> int:
    try:
        status = fn(*fn_args)
    except BrokenPipeError:  # the reader of stdout went away (`elmforge jobs list | head -1`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exiting does not flush into it again
        return 141  # as a process that SIGPIPE ended
    except (ValueError, OSError, TrainingError) as e:  # one clear message (a missing file, a full disk), no traceback
        if os.environ.get("ELMFORGE_DEBUG"):
            raise
        _disconnect_ray()
        if isinstance(e, ConfigError):  # a config problem the verb found itself (a sweep's space, say)
            print(f"elmforge {verb}: config error\n{e}", file=sys.stderr)
            return 2
        hint = "" if isinstance(e, (SubmitError, ClusterUnreachable)) else "\n(set ELMFORGE_DEBUG=1 for a traceback)"
        print(f"elmforge {verb}: {e}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C twice while training (once asks for a checkpoint), or any other verb
        print(f"\nelmforge {verb}: interrupted", file=sys.stderr)
        return 130
    return status or 0  # a verb may return its own exit status (`jobs status` of a failed job)


def _is_override(arg: str) -> bool:
    """key=value, not a file whose path holds `=` (a `lang=en/` partition directory, say)."""
    return is_override(arg) and not glob.glob(arg)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    verb_error = parser.verb_parsers[args.verb].error  # with the verb's own usage
    # Overrides after a flag (`jobs logs ID --follow submit.address=...`) land here: take them back.
    strays = [a for a in extra if "=" in a and not a.startswith("-")]
    if len(strays) != len(extra) or (strays and not hasattr(args, "overrides")):
        verb_error(f"unrecognized arguments: {' '.join(extra)}")
    for listed in ("text", "checkpoint"):  # `--text a.txt b.txt data.dir=...`: the list took the overrides too
        given = getattr(args, listed, None)
        if given:
            taken = [a for a in given if _is_override(a)]
            strays += taken
            setattr(args, listed, [a for a in given if a not in taken] or verb_error(f"--{listed}: none given"))
    if strays:
        args.overrides += strays
    if getattr(args, "path", None) and _is_override(args.path):  # `eval data.dir=... [PATH]`: the path follows
        args.overrides.insert(0, args.path)
        paths = [o for o in args.overrides if not _is_override(o)]
        args.path = paths[0] if paths else None
        args.overrides = [o for o in args.overrides if o != args.path]
    if args.verb in ("eval", "generate") and args.path is None and args.cfg is None:
        verb_error("the following arguments are required: path")
    if args.verb == "generate" and args.prompt is None and args.cfg is None:
        verb_error("the following arguments are required: --prompt")
    if getattr(args, "greedy", False) and (args.temperature is not None or args.top_k is not None):
        verb_error("--greedy always takes the most likely token: give it, or --temperature/--top-k, not both")
    if args.verb == "eval" and args.seq_len is not None and not args.text:
        verb_error("--seq-len applies to --text only (the val split's samples have the dataset's length)")
    if args.verb == "eval" and args.text_field != "text" and not args.text:
        verb_error("--text-field applies to --text only")
    if args.verb == "eval" and args.separator is not None and not args.text:
        verb_error("--separator applies to --text only")
    if args.verb == "eval" and args.separator == "":
        verb_error("--separator: give the string documents end at (leave it out: a file is one document)")
    if args.verb == "report":
        return _run("report", _report, args)
    if args.verb == "jobs" and args.action is None:
        verb_error(f"an action is required: {', '.join(JOB_ACTIONS)}")
    if args.verb == "jobs" and args.job_id and "=" in args.job_id:  # `jobs list key=value`: no id given
        args.overrides.insert(0, args.job_id)
        args.job_id = None
    if args.verb == "jobs" and args.action != "list" and not args.job_id:
        verb_error(f"jobs {args.action} needs a job id (see `elmforge jobs list`)")
    if args.verb == "jobs" and args.follow and args.action != "logs":
        verb_error("--follow applies to `jobs logs` only")
    try:
        compose = compose_config
        if args.verb == "sweep":  # a searched key's base value is replaced by every trial's
            from cluster.sweep_trial import compose_sweep_base as compose
        cfg = compose(args.overrides + _implicit_overrides(args))
    except ConfigError as e:
        print(f"elmforge {args.verb}: config error\n{e}", file=sys.stderr)
        return 2
    if args.cfg == "job":
        if args.verb == "sweep":  # run.name and run.dir are each trial's own
            from cluster.sweep_trial import trial_config

            cfg = trial_config(cfg, {}, "<trial>")
            print("# each trial trains with this config and its own values of sweep.space")
        print(to_yaml(cfg), end="")
        return 0
    return _run(args.verb, getattr(commands, f"cmd_{args.verb}"), cfg, args)


if __name__ == "__main__":
    sys.exit(main())

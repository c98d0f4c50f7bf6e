"""transformers' generate() on our exported model, with its KV cache and without, side by side.

A randomly initialised model of a conf/model config is exported (trainer.hf.save_hf_checkpoint)
and loaded as users load it (AutoModelForCausalLM, trust_remote_code=True). Each repetition times
greedy generation of --new-tokens after a --prompt-tokens prompt, with use_cache on and off in turn;
the two must give the same tokens. Prints new tokens/s for each and their ratio (medians).

    .venv/bin/python bench/hf_generate.py --model openelm_270m --new-tokens 64
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from shared import conf_model, cpu_name  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="openelm_tiny", help="a conf/model name (default: openelm_tiny)")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary size for a model that takes it from "
                                                              "the tokenizer (default: 32000)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", help="write the figures as JSON here too")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from trainer.hf import save_hf_checkpoint
    from trainer.model import build_model

    torch.set_num_threads(args.threads)
    cfg = conf_model(args.model, vocab=args.vocab)
    with tempfile.TemporaryDirectory() as tmp:
        out = save_hf_checkpoint(build_model(cfg, seed=0), os.path.join(tmp, "hf"))
        model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    prompt = torch.randint(3, cfg.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))

    def generate(use_cache: bool) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        with torch.no_grad():
            ids = model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=False, use_cache=use_cache)
        return args.new_tokens / (time.perf_counter() - start), ids

    generate(True)  # warm-up
    rates = {True: [], False: []}
    for _ in range(args.repeats):
        for use_cache in (True, False):
            rate, ids = generate(use_cache)
            rates[use_cache].append(rate)
            if use_cache:
                cached_ids = ids
            elif not torch.equal(ids, cached_ids):
                raise SystemExit("generate with and without the cache gave different tokens")
    cached, plain = statistics.median(rates[True]), statistics.median(rates[False])
    result = {"model": args.model, "cpu": cpu_name(), "threads": args.threads, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "repeats": args.repeats, "cached_tok_s": cached,
              "uncached_tok_s": plain, "speedup": cached / plain}
    print(f"{args.model}, {args.threads} thread(s), {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens: "
          f"with the KV cache {cached:,.1f} tok/s, without {plain:,.1f} tok/s: {cached / plain:.2f}x "
          f"(medians of {args.repeats}; {cpu_name()})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

"""Data pipeline benchmark: `elmforge prepare` and the training loader, against baselines measured in the same run.

    .venv/bin/python bench/prepare_throughput.py [--sizes 100,1000] [--quick] [--repeat N] [--workdir DIR]

What it measures, each run in a fresh child process (so memory and Ray state never carry over):

1. Corpora: generated JSONL of the given sizes (MB = 10^6 bytes), documents of 1-10 KB
   (log-uniform) made of lines drawn with a seeded RNG from the bundled SQLite docs,
   written once into `<workdir>/corpus-<MB>mb/` in files of at most --file-mb MB.
2. Prepare throughput, tokens/s: `data_pipelines.prepare.prepare` on the config that
   `elmforge prepare` composes (cluster.config.compose_config) with tokenizer=file, a
   byte-level BPE trained beforehand on the sample corpus (its training time is printed,
   not included), seq_len 2048. Two paths: Ray Data (data.workers=null, embedded Ray via
   cluster.ray_runtime.connect with cluster.num_cpus=4; Ray's start is not timed) and
   in-process (data.workers=0). Baseline, on the same corpus and cores: read the JSONL,
   raw `tokenizers.Tokenizer.encode_batch` in batches of 1024 (Rayon threads on all
   cores), count the tokens. Goal: ours >= 0.8x the baseline. Also printed: the CPU
   seconds of all processes within the timed window.
3. Peak memory of the whole process tree (driver, Ray daemons, workers and actors): the
   summed RSS of the child and all its descendants, sampled every 0.1 s. Goal: the peak
   at the largest size < 1.2x the peak at the smallest.
4. Loader tokens/s for one rank: TokenLoader (rank 0 of 1, shuffled, micro-batch 8 x
   2049, seq_len 2048) over shards of a --loader-mb corpus, with 0 and 2 DataLoader
   workers: the first epoch (construction, worker start, every shard's first-open
   checksum and index) and the steady state (further epochs). Goal >= 1M tokens/s.

With --repeat N each prepare measurement and its baseline run N times, interleaved, and
the fastest run counts (the one least disturbed by other work on the machine). --quick
(2 and 8 MB, BPE vocab 4096, a 4 MB loader corpus) is a smoke check of well under a minute.
"""

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data_pipelines" / "sample" / "sqlite_docs.jsonl.gz"
CORPUS_VERSION = 1  # bump when the generator changes, so cached corpora are rebuilt
SEED = 1234


# ----------------------------------------------------------------------------- corpus


def generate_corpus(directory: Path, size_mb: float, file_mb: float) -> Path:
    """Deterministic JSONL corpus of about size_mb MB (10^6 bytes), written once."""
    done = directory / "COMPLETE"
    if done.is_file() and json.loads(done.read_text()) == {"version": CORPUS_VERSION, "mb": size_mb, "file_mb": file_mb}:
        return directory
    import numpy as np

    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    lines = []
    with gzip.open(SAMPLE, "rt") as f:
        for record in map(json.loads, f):
            lines += [ln.strip() for ln in record["text"].splitlines() if len(ln.strip()) >= 20]
    lengths = np.array([len(ln.encode()) + 1 for ln in lines])
    rng = np.random.default_rng([SEED, int(size_mb * 1000)])
    total, target, per_file = 0, int(size_mb * 1e6), int(file_mb * 1e6)
    doc_id, file_no, out, in_file = 0, 0, None, 0
    while total < target:
        if out is None or in_file >= per_file:
            if out:
                out.close()
            out, in_file = open(directory / f"part-{file_no:05d}.jsonl", "w"), 0
            file_no += 1
        # Draw lines in bulk, then cut them into documents of 1-10 KB (log-uniform).
        picks = rng.integers(0, len(lines), size=200_000)
        cuts = np.cumsum(lengths[picks])
        start, start_bytes = 0, 0
        chunk = []
        while start < len(picks) and total < target and in_file < per_file:
            want = int(np.exp(rng.uniform(np.log(1000), np.log(10000))))
            end = int(np.searchsorted(cuts, start_bytes + want)) + 1
            if end > len(picks):
                break
            text = "\n".join(lines[i] for i in picks[start:end])
            row = json.dumps({"id": doc_id, "text": text}) + "\n"
            chunk.append(row)
            doc_id += 1
            total += len(row)
            in_file += len(row)
            start_bytes = int(cuts[end - 1])
            start = end
        out.write("".join(chunk))
    out.close()
    done.write_text(json.dumps({"version": CORPUS_VERSION, "mb": size_mb, "file_mb": file_mb}))
    return directory


def train_tokenizer(workdir: Path, vocab: int) -> tuple[Path, float]:
    """A byte-level BPE trained on the bundled sample corpus (cached); returns (path, training seconds)."""
    path = workdir / f"bpe-{vocab}.json"
    meta = workdir / f"bpe-{vocab}.time"
    if path.is_file() and meta.is_file():
        return path, float(meta.read_text())
    from data_pipelines.cleaning import clean_text
    from data_pipelines.tokenizer import train_bpe

    with gzip.open(SAMPLE, "rt") as f:
        texts = [clean_text(json.loads(line)["text"]) for line in f]
    t0 = time.perf_counter()
    tok = train_bpe(texts, vocab)
    seconds = time.perf_counter() - t0
    path.write_bytes(tok.payload)
    meta.write_text(f"{seconds:.3f}")
    return path, seconds


# ----------------------------------------------------------------------------- children


def child_baseline(args) -> dict:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(args.tokenizer)
    time.sleep(0.25)  # the monitor's last reading before the timed window
    w0 = time.time()
    t0 = time.perf_counter()
    tokens = docs = 0
    batch: list[str] = []
    for path in sorted(Path(args.corpus).glob("*.jsonl")):
        with open(path, "rb") as f:
            for line in f:
                batch.append(json.loads(line)["text"])
                if len(batch) == 1024:
                    tokens += sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
                    docs += len(batch)
                    batch = []
    if batch:
        tokens += sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
        docs += len(batch)
    return {"seconds": time.perf_counter() - t0, "window": (w0, time.time()), "tokens": tokens, "documents": docs}


def child_prepare(args) -> dict:
    from cluster.config import compose_config

    workers = "null" if args.path == "ray" else "0"
    overrides = [
        f"storage_path={args.workdir}",
        "data.name=bench",
        f"data.dir={args.out}",
        f"data.sources=[{{name:bench,path:'{args.corpus}/*.jsonl',text_field:text}}]",
        f"data.seq_len={args.seq_len}",
        f"data.workers={workers}",
        "tokenizer=file",
        f"tokenizer.path={args.tokenizer}",
        f"tokenizer.vocab_size={args.vocab}",
        "prepare.force=true",
        "logger=none",
    ]
    cfg = compose_config(overrides)
    ray_start = 0.0
    if args.path == "ray":
        from cluster.ray_runtime import connect

        t0 = time.perf_counter()
        connect(cfg["cluster"])
        ray_start = time.perf_counter() - t0
    from data_pipelines.manifest import read_manifest
    from data_pipelines.prepare import prepare

    time.sleep(0.25)  # the monitor's last reading before the timed window
    w0 = time.time()
    t0 = time.perf_counter()
    out = prepare(cfg["data"], cfg["tokenizer"], force=True)
    seconds = time.perf_counter() - t0
    window = (w0, time.time())
    time.sleep(0.25)
    stats = read_manifest(out).data["stats"]
    return {
        "seconds": seconds,
        "window": window,
        "ray_start": ray_start,
        # Corpus tokens (without the BOS/EOS framing), comparable with the baseline's count.
        "tokens": stats["tokens"] - 2 * stats["documents_kept"],
        "documents": stats["documents_read"],
        "kept": stats["documents_kept"],
    }


def child_loader(args) -> dict:
    import torch

    from data_pipelines.loader import TokenLoader
    from data_pipelines.manifest import read_manifest

    torch.set_num_threads(1)
    m = read_manifest(args.out)
    n = m.num_samples("train")
    per_epoch = n // args.batch
    # First epoch: construction (tokenizer check), DataLoader workers starting, every shard's
    # first open (size, SHA-256, member index) in every worker, then reading.
    t0 = time.perf_counter()
    loader = TokenLoader(args.out, "train", 0, 1, batch_size=args.batch, seed=0, shuffle=True, num_workers=args.loader_workers)
    it = iter(loader)
    tokens = sum(next(it).numel() for _ in range(per_epoch))
    first = time.perf_counter() - t0
    # Steady state: whole further epochs (every shard already open), at least --steady seconds.
    t1 = time.perf_counter()
    steady_tokens = 0
    while time.perf_counter() - t1 < args.steady:
        steady_tokens += sum(next(it).numel() for _ in range(per_epoch))
    steady = time.perf_counter() - t1
    return {
        "first_epoch_tps": tokens / first,
        "steady_tps": steady_tokens / steady,
        "first_seconds": first,
        "steady_seconds": steady,
        "shards": len(m.shards("train")),
        "samples": n,
    }


CHILDREN = {"baseline": child_baseline, "prepare": child_prepare, "loader": child_loader}


# ----------------------------------------------------------------------------- parent


class TreeMonitor:
    """Samples a process and all its descendants every 0.1 s: the peak of their summed RSS, and
    each one's CPU seconds (user + system) so the CPU used within a time window can be told."""

    def __init__(self, pid: int):
        import psutil

        self.root = psutil.Process(pid)
        self.peak = 0
        self.samples: list[tuple[float, dict]] = []  # (time.time(), {(pid, create_time): cpu seconds})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        import psutil

        while not self._stop.is_set():
            total, cpu = 0, {}
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except psutil.Error:
                procs = []
            for p in procs:
                try:
                    with p.oneshot():
                        total += p.memory_info().rss
                        t = p.cpu_times()
                        cpu[(p.pid, p.create_time())] = t.user + t.system
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self.samples.append((time.time(), cpu))
            self._stop.wait(0.1)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak

    def cpu_between(self, t0: float, t1: float) -> float:
        """CPU seconds the tree used between two time.time() readings (to within one sample)."""
        last: dict = {}
        start: dict = {}
        for when, cpu in self.samples:
            if when <= t0:
                start = cpu
            if when <= t1:
                for k, v in cpu.items():
                    last[k] = v
        return sum(v - start.get(k, 0.0) for k, v in last.items())


CODE = ROOT  # the checkout whose pipeline the children run (--code)


def run_child(kind: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--child", kind]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "PYTHONPATH": str(CODE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if "workdir" in kw:
        # Ray's own temp dir: with the default /tmp/ray, ray.init(address=None) joins any head a
        # `ray start` on this machine recorded there instead of starting the embedded instance.
        env["RAY_TMPDIR"] = str(Path(kw["workdir"]) / "rt")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=CODE, env=env)
    monitor = TreeMonitor(proc.pid)
    out, err = proc.communicate()
    peak = monitor.stop()
    if proc.returncode != 0:
        sys.stderr.write(out[-4000:] + err[-4000:])
        raise SystemExit(f"benchmark child {kind} {kw} failed with exit code {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss"] = peak
    if "window" in result:  # the timed part, as time.time() readings
        result["cpu_seconds"] = monitor.cpu_between(*result["window"])
    return result


def fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f}M tok/s" if x >= 1e6 else f"{x / 1e3:.0f}k tok/s"


def best(runs: list[dict]) -> dict:
    """The fastest run (the one least disturbed by other work on the machine), with the peak memory of any."""
    fastest = min(runs, key=lambda r: r["seconds"])
    return {**fastest, "peak_rss": max(r["peak_rss"] for r in runs), "all_seconds": [r["seconds"] for r in runs]}


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=None, help="corpus sizes in MB, comma-separated (default 100,1000; --quick 2,8)")
    p.add_argument("--quick", action="store_true", help="small sizes and vocabulary, for a smoke check in under a minute")
    p.add_argument("--workdir", default="/tmp/elmforge-bench", help="corpus cache, tokenizer and prepared data")
    p.add_argument("--vocab", type=int, default=None, help="BPE vocabulary, trained once on the sample corpus (default 32000; --quick 4096)")
    p.add_argument("--file-mb", type=float, default=100, help="largest generated JSONL file, MB")
    p.add_argument("--paths", default="ray,inprocess", help="prepare paths to time: ray (data.workers=null), inprocess (data.workers=0)")
    p.add_argument("--repeat", type=int, default=1, help="runs of each prepare measurement and its baseline, interleaved; the fastest counts")
    p.add_argument("--loader-mb", type=float, default=None, help="corpus MB for the loader measurement (default 50; --quick 4)")
    p.add_argument("--no-loader", action="store_true")
    p.add_argument("--code", default=str(ROOT), help="run the pipeline of another checkout (before/after comparisons)")
    # child mode (internal)
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    for name in ("corpus", "tokenizer", "out", "path"):
        p.add_argument(f"--{name}", help=argparse.SUPPRESS)
    for name in ("seq-len", "batch", "loader-workers"):
        p.add_argument(f"--{name}", type=int, help=argparse.SUPPRESS)
    p.add_argument("--steady", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    global CODE
    CODE = Path(args.code).resolve()
    if args.child:
        result = CHILDREN[args.child](args)
        print(json.dumps(result), flush=True)
        return 0

    sizes = [float(s) for s in (args.sizes or ("2,8" if args.quick else "100,1000")).split(",")]
    sizes = [int(s) if s == int(s) else s for s in sizes]
    loader_mb = args.loader_mb or (4 if args.quick else 50)
    vocab = args.vocab or (4096 if args.quick else 32000)
    paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"[bench] {os.cpu_count()} CPUs, load average at start {load_average()}, pipeline code {CODE}", flush=True)

    tok_path, bpe_seconds = train_tokenizer(work, vocab)
    print(f"[bench] tokenizer {tok_path}: byte-level BPE, vocab {vocab}, trained in {bpe_seconds:.1f}s on the "
          "6.8 MB sample corpus (not part of the timings below)", flush=True)
    rows = []  # (measurement, ours, baseline, ratio, goal, met: True/False/None)
    peaks: dict[str, dict] = {p_: {} for p_ in paths}
    for size in sizes:
        t0 = time.perf_counter()
        corpus = generate_corpus(work / f"corpus-{size}mb", size, args.file_mb)
        files = sorted(corpus.glob("*.jsonl"))
        nbytes = sum(f.stat().st_size for f in files)
        print(f"[bench] corpus {corpus}: {nbytes / 1e6:.0f} MB in {len(files)} file(s) ({time.perf_counter() - t0:.1f}s)", flush=True)
        runs: dict[str, list] = {"baseline": [], **{path: [] for path in paths}}
        for _ in range(args.repeat):  # rounds of baseline then each path, so a load change hits all alike
            runs["baseline"].append(run_child("baseline", corpus=corpus, tokenizer=tok_path))
            for path in paths:
                out = work / f"data-{size}mb-{path}"
                runs[path].append(run_child("prepare", corpus=corpus, tokenizer=tok_path, out=out, path=path, seq_len=2048,
                                            workdir=work, vocab=vocab))
                shutil.rmtree(out, ignore_errors=True)
        base = best(runs["baseline"])
        base_tps = base["tokens"] / base["seconds"]
        print(f"[bench] {size} MB baseline (read JSONL + encode_batch): {base['tokens']:,} tokens in {base['seconds']:.1f}s "
              f"= {fmt_rate(base_tps)}, {base['cpu_seconds']:.0f} CPU-s, peak {base['peak_rss'] / 2**20:.0f} MiB "
              f"(runs {', '.join(f'{x:.1f}' for x in base['all_seconds'])}s)", flush=True)
        for path in paths:
            res = best(runs[path])
            tps = res["tokens"] / res["seconds"]
            peaks[path][size] = res["peak_rss"]
            ray_start = f", Ray start {res['ray_start']:.1f}s not timed" if path == "ray" else ""
            print(f"[bench] {size} MB prepare ({path}): {res['tokens']:,} tokens in {res['seconds']:.1f}s = {fmt_rate(tps)}, "
                  f"{res['cpu_seconds']:.0f} CPU-s{ray_start}, peak {res['peak_rss'] / 2**20:.0f} MiB "
                  f"(runs {', '.join(f'{x:.1f}' for x in res['all_seconds'])}s)", flush=True)
            if res["tokens"] != base["tokens"]:
                print(f"[bench] note: prepare kept {res['tokens']:,} tokens, the baseline counted {base['tokens']:,}", flush=True)
            ratio = tps / base_tps
            rows.append((f"prepare {size} MB, {path}: tokens/s", fmt_rate(tps), fmt_rate(base_tps), f"{ratio:.2f}", ">= 0.8", ratio >= 0.8))
            rows.append((f"prepare {size} MB, {path}: CPU-s (all processes)", f"{res['cpu_seconds']:.1f}",
                         f"{base['cpu_seconds']:.1f}", f"{res['cpu_seconds'] / base['cpu_seconds']:.2f}", "-", None))
    for path in paths:
        if len(sizes) > 1:
            small, large = min(sizes), max(sizes)
            ratio = peaks[path][large] / peaks[path][small]
            rows.append((f"peak RSS of the process tree, {path}: {large} MB vs {small} MB", f"{peaks[path][large] / 2**20:.0f} MiB",
                         f"{peaks[path][small] / 2**20:.0f} MiB", f"{ratio:.3f}", "< 1.2", ratio < 1.2))
    if not args.no_loader:
        corpus = generate_corpus(work / f"corpus-{loader_mb}mb", loader_mb, args.file_mb)
        out = work / f"data-loader-{loader_mb}mb"
        run_child("prepare", corpus=corpus, tokenizer=tok_path, out=out, path="inprocess", seq_len=2048, workdir=work, vocab=vocab)
        for k in (0, 2):
            res = run_child("loader", out=out, batch=8, loader_workers=k, steady=1.0 if args.quick else 3.0)
            print(f"[bench] loader, {k} DataLoader workers, {res['samples']} samples in {res['shards']} shards: first epoch "
                  f"{fmt_rate(res['first_epoch_tps'])} ({res['first_seconds']:.2f}s, with start-up and checksums), steady "
                  f"{fmt_rate(res['steady_tps'])} ({res['steady_seconds']:.1f}s)", flush=True)
            for label, key in (("first epoch (start-up, checksums)", "first_epoch_tps"), ("steady state", "steady_tps")):
                rows.append((f"loader 8x2049, {k} workers: {label}", fmt_rate(res[key]), "-", "-", ">= 1M tok/s", res[key] >= 1e6))
        shutil.rmtree(out, ignore_errors=True)

    header = ("measurement", "ours", "baseline", "ratio", "goal", "met?")
    table = [header] + [r[:5] + ({True: "yes", False: "no", None: "-"}[r[5]],) for r in rows]
    widths = [max(len(str(r[i])) for r in table) for i in range(len(header))]
    print()
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in table[1:]:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
    print(f"\n[bench] sizes {sizes} MB, BPE vocab {vocab}, best of {args.repeat}, {os.cpu_count()} CPUs, "
          f"load average at end {load_average()}, total {time.perf_counter() - started:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training-path overhead: tokens/s per worker of `elmforge train` (Ray + DeepSpeed + loader)
against a bare single-process PyTorch loop on the same model, batch and thread count.

    .venv/bin/python bench/train_overhead.py [--quick] [--workers 1,2] [--steps 30] [--repeats 3]
        [--model openelm_tiny] [--zero zero2] [--set key=value ...] [--no-local] [--out results.json]

Full path: the config `elmforge train` composes (cluster.config.compose_config: model, data from
the bundled sample corpus prepared once with data.workers=0, logger=none, cluster.num_workers=N,
cluster.cpus_per_worker, train.max_steps, a fresh run.name per run) run through
cluster.launch.launch_training on an embedded Ray (cluster.num_cpus, default 4), started and shut
down around every run as each `elmforge train` does. Per step, from rank 0's metrics.jsonl,
leaving out the first --skip steps:
- tok/s (wall): the interval between consecutive records' `time`, i.e. the whole loop iteration
  (loader, forward, backward, engine.step, the loss all-reduces, metrics write, preemption check);
- logged: the record's own tokens_per_s (its step_time_s stops before the loss all-reduces, the
  metrics write and the preemption check, so it overstates by "ms/step after step_time");
- CPU ms/step: user + system CPU of the worker processes (and what they fork: DataLoader
  workers), sampled with psutil, over the same steps; "Ray system": Ray's own processes.
Per worker = global / N.

Baselines, with the torch thread count and niceness a Ray Train worker gets (measured first by a
probe TorchTrainer with the same ScalingConfig; Ray sets OMP_NUM_THREADS from cpus_per_worker and
runs workers at nice 15):
- bare: one process, no Ray, no DeepSpeed, no loader: trainer.model.build_model (same
  OpenELMConfig and seed), torch.optim.AdamW over trainer.optim.param_groups with the run's lr,
  betas, eps and weight decay and its warmup-cosine LambdaLR, lm_loss with the run's z-loss,
  clip_grad_norm_(train.grad_clip), zero_grad(set_to_none), loss.item() per step; the same
  micro-batch x grad_accum x seq_len, on batches of the prepared data read into memory first;
  freed memory kept for reuse as in the trainer (trainer.host_memory).
- bare xN (N > 1): N bare processes at once, counted over the window all N were in steady state.
- no-Ray: the same `elmforge train` overrides with cluster.launcher=local (torchrun for N > 1):
  DeepSpeed + loader + loop without Ray.

Runs alternate (ray, bare, no-Ray, bare xN; the next repetition in the opposite order) so a load
change on the machine hits every path; ratios are taken per repetition between runs made next to
each other, and the table gives the median over repetitions with (min-max).
Goal: full-path tok/s per worker >= 0.9 x bare tok/s ("met?"). On a machine shared with other
jobs the wall-clock ratio moves with their load; the CPU ratio (bare CPU ms/step / full CPU
ms/step, "met? (CPU)") is what the ratio would be with a core per worker to itself.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from shared import cpu_name  # noqa: E402

GOAL = 0.9


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


# --------------------------------------------------------------------------- the bare loop (child)


def bare_main(spec_path: str) -> None:
    """One bare training process; prints one JSON line with per-step (start, end) wall times."""
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    from trainer.host_memory import keep_freed_memory

    keep_freed_memory()  # as train() does: the ratio is then the framework's cost, not the allocator's
    from data_pipelines.loader import TokenLoader
    from data_pipelines.manifest import read_manifest
    from trainer.loss import lm_loss
    from trainer.model import OpenELMConfig, build_model
    from trainer.optim import param_groups, warmup_cosine_scheduler

    cfg = spec["cfg"]
    t = cfg["train"]
    if t["precision"] != "fp32":
        raise SystemExit("the bare baseline is fp32 only")
    model = build_model(OpenELMConfig(**cfg["model"]), seed=t["seed"]).train()
    opt = torch.optim.AdamW(
        param_groups(model, t["weight_decay"]), lr=t["lr"], betas=tuple(t["betas"]), eps=t["eps"],
        weight_decay=t["weight_decay"], fused=True,  # as the trainer's (trainer/deepspeed_config.py)
    )
    sched = warmup_cosine_scheduler(opt, t)
    manifest = read_manifest(cfg["data"]["dir"])
    loader = TokenLoader(manifest.root, "train", 0, 1, t["micro_batch_size"], t["seed"], num_workers=0)
    batches = [next(loader) for _ in range(spec["batches"])]  # in memory before the clock starts
    accum, params = t["grad_accum_steps"], list(model.parameters())
    if spec.get("start_at"):  # concurrent runs start together
        time.sleep(max(0.0, spec["start_at"] - time.time()))
    times, i = [], 0
    for _ in range(spec["steps"]):
        start, cpu = time.time(), time.process_time()
        for _ in range(accum):
            batch = batches[i % len(batches)]
            i += 1
            loss, _ = lm_loss(model(batch[:, :-1]), batch[:, 1:], t["z_loss_weight"])
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(params, t["grad_clip"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append((start, time.time(), time.process_time() - cpu))
    print("BARE_RESULT " + json.dumps({
        "pid": os.getpid(), "threads": torch.get_num_threads(), "nice": os.nice(0), "times": times,
        "tokens_per_step": t["micro_batch_size"] * accum * manifest.seq_len,
    }), flush=True)


def run_bare(cfg: dict, steps: int, skip: int, threads: int, nice: int, procs: int, workdir: Path) -> dict:
    """`procs` bare processes at once; tok/s per process over the window all are in steady state."""
    spec = {"cfg": cfg, "steps": steps, "threads": threads, "batches": 16,
            "start_at": time.time() + 8.0 if procs > 1 else None}  # imports + data read take a few seconds
    spec_path = Path(tempfile.mkstemp(dir=workdir, suffix=".json")[1])
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}

    def set_nice():
        os.nice(max(0, nice - os.nice(0)))

    children = [
        subprocess.Popen([sys.executable, __file__, "--_bare", str(spec_path)], stdout=subprocess.PIPE,
                         text=True, env=env, preexec_fn=set_nice, cwd=ROOT)
        for _ in range(procs)
    ]
    results = []
    for child in children:
        out, _ = child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"bare baseline process failed (exit {child.returncode}):\n{out[-3000:]}")
        line = next(x for x in out.splitlines() if x.startswith("BARE_RESULT "))
        results.append(json.loads(line[len("BARE_RESULT "):]))
    spec_path.unlink()
    tokens = results[0]["tokens_per_step"]
    # Steady window: after every process's warm-up, before the first one finished.
    lo = max(r["times"][skip][0] for r in results)
    hi = min(r["times"][-1][1] for r in results)
    per_proc = []
    for r in results:
        steady = [(e - s, c) for s, e, c in r["times"][skip:] if s >= lo and e <= hi]
        if len(steady) < 3:
            raise RuntimeError("the concurrent bare runs overlapped for fewer than 3 steady steps; raise --steps")
        durations = [d for d, _ in steady]
        per_proc.append({"step_s": durations, "tok_s": tokens / statistics.median(durations),
                         "tok_s_mean": tokens * len(durations) / sum(durations),
                         "cpu_ms_per_step": statistics.median(c for _, c in steady) * 1e3})
    return {
        "procs": procs, "threads": results[0]["threads"], "nice": results[0]["nice"], "tokens_per_step": tokens,
        "tok_s": statistics.mean(p["tok_s"] for p in per_proc),
        "tok_s_mean": statistics.mean(p["tok_s_mean"] for p in per_proc),
        "cpu_ms_per_step": statistics.mean(p["cpu_ms_per_step"] for p in per_proc),
        "per_process": per_proc,
    }


class CpuSampler:
    """CPU seconds (user + system) of a process tree over time, split into the training workers (a
    process `is_worker` accepts, and everything it forks: DataLoader workers) and the rest."""

    def __init__(self, root_pid: int, is_worker, interval: float = 0.2, include_root: bool = True):
        import threading

        self.root, self.is_worker, self.interval, self.include_root = root_pid, is_worker, interval, include_root
        self.samples: list[tuple[float, float, float]] = []  # (time, worker CPU s, other CPU s)
        self._last: dict[int, tuple[bool, float]] = {}  # pid -> (worker?, CPU s), dead processes keep theirs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.root)
            procs = root.children(recursive=True) + ([root] if self.include_root else [])
        except psutil.Error:
            return
        worker_pids = set()
        for proc in procs:
            try:
                if self.is_worker(proc.cmdline()):
                    worker_pids.add(proc.pid)
                    worker_pids.update(c.pid for c in proc.children(recursive=True))
            except psutil.Error:
                continue
        now = time.time()
        for proc in procs:
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue
            known = self._last.get(proc.pid)
            self._last[proc.pid] = ((known and known[0]) or proc.pid in worker_pids, t.user + t.system)
        worker = sum(c for w, c in self._last.values() if w)
        self.samples.append((now, worker, sum(c for w, c in self._last.values() if not w)))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)
        self._sample()

    def between(self, t0: float, t1: float) -> tuple[float, float]:
        """(worker, other) CPU seconds spent between two wall times, interpolating the samples."""
        def at(t: float, i: int) -> float:
            pts = self.samples
            for (ta, *a), (tb, *b) in zip(pts, pts[1:]):
                if ta <= t <= tb:
                    return a[i] + (b[i] - a[i]) * (t - ta) / max(tb - ta, 1e-9)
            return pts[0][i + 1] if t < pts[0][0] else pts[-1][i + 1]

        return at(t1, 0) - at(t0, 0), at(t1, 1) - at(t0, 1)


# --------------------------------------------------------------------------- the full path


def _probe_worker(config: dict) -> None:
    """Inside a Ray Train worker (the training thread): what the training loop will run with."""
    import threading

    import ray.train
    import torch

    from cluster.launch import use_allotted_threads

    use_allotted_threads()  # as the training worker does first
    rank = ray.train.get_context().get_world_rank()
    info = {
        "rank": rank, "torch_threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "nice": os.nice(0),
        "affinity": sorted(os.sched_getaffinity(0)), "main_thread": threading.current_thread() is threading.main_thread(),
    }
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(info))


def probe_workers(cfg: dict, workdir: Path) -> list[dict]:
    """Start Ray as launch_training does and run a TorchTrainer with the same ScalingConfig."""
    from ray.train import RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.launch import scaling_config, torch_backend
    from cluster.ray_runtime import connect

    connect(cfg["cluster"])
    out = Path(tempfile.mkdtemp(dir=workdir, prefix="probe-"))
    TorchTrainer(
        _probe_worker, train_loop_config={"out": str(out)}, scaling_config=scaling_config(cfg["cluster"]),
        torch_config=TorchConfig(backend=torch_backend(cfg["cluster"])),
        run_config=RunConfig(name=out.name, storage_path=str(workdir / "ray")),
    ).fit()
    infos = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    shutil.rmtree(out, ignore_errors=True)
    return infos


def run_full(cfg: dict, skip: int, keep: bool) -> dict:
    """The full path: launch_training on a freshly started embedded Ray, shut down after."""
    import ray

    from cluster.launch import launch_training

    def is_worker(cmdline: list[str]) -> bool:
        return bool(cmdline) and cmdline[0].startswith("ray::RayTrainWorker")

    start = time.time()
    with CpuSampler(os.getpid(), is_worker, include_root=False) as cpu:
        launch_training(cfg)
    total = time.time() - start
    ray.shutdown()
    return read_run(cfg, skip, keep, start, total, cpu)


def run_local(cfg: dict, skip: int, keep: bool, threads: int, nice: int, overrides: list[str]) -> dict:
    """The same loop without Ray: `elmforge train cluster.launcher=local` (N = 1) or under torchrun,
    with the worker's thread count and niceness."""
    n = cfg["cluster"]["num_workers"]
    cli = ["-m", "cluster.cli", "train", *overrides, "cluster.launcher=local"]
    if n == 1:
        cmd = [sys.executable, *cli]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *cli]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": "cpu", "WANDB_SILENT": "true"}
    def is_worker(cmdline: list[str]) -> bool:  # not torchrun's agent
        return "cluster.cli" in cmdline and "torch.distributed.run" not in cmdline

    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            preexec_fn=lambda: os.nice(max(0, nice - os.nice(0))))
    with CpuSampler(proc.pid, is_worker) as cpu:
        out, _ = proc.communicate()
    total = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{out[-3000:]}")
    return read_run(cfg, skip, keep, start, total, cpu)


def read_run(cfg: dict, skip: int, keep: bool, start: float, total: float, cpu: CpuSampler) -> dict:
    """Per-step throughput from rank 0's metrics.jsonl, steps after `skip`."""
    n = cfg["cluster"]["num_workers"]
    run_dir = Path(cfg["run"]["dir"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    if not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    if len(records) < skip + 3:
        raise RuntimeError(f"only {len(records)} steps logged; raise --steps above --skip + 2")
    tokens = records[1]["tokens"] - records[0]["tokens"]
    steady = [(prev, rec) for prev, rec in zip(records, records[1:]) if rec["step"] > skip]
    intervals = [rec["time"] - prev["time"] for prev, rec in steady]
    step_times = [rec["step_time_s"] for _, rec in steady]
    outside = [iv - st for iv, st in zip(intervals, step_times)]
    # CPU over the steady steps: from the end of step `skip` to the last record (before the final checkpoint).
    first = next(prev for prev, rec in steady)
    worker_cpu, other_cpu = cpu.between(first["time"], records[-1]["time"])
    return {
        "cpu_ms_per_step": worker_cpu / len(steady) / n * 1e3,
        "other_cpu_ms_per_step": other_cpu / len(steady) * 1e3,
        "workers": n, "tokens_per_step": tokens,
        "wall_tok_s_per_worker": tokens / statistics.median(intervals) / n,
        "wall_tok_s_per_worker_mean": tokens * len(intervals) / sum(intervals) / n,
        "logged_tok_s_per_worker": statistics.median(rec["tokens_per_s"] for _, rec in steady) / n,
        "interval_s": intervals, "step_time_s": step_times,
        "outside_step_time_ms_median": statistics.median(outside) * 1e3,
        "startup_s": records[0]["time"] - records[0]["step_time_s"] - start,
        "total_s": total,
    }


# --------------------------------------------------------------------------- driver


def overrides_for(args, workers: int, run_name: str) -> list[str]:
    """The `elmforge train` command-line overrides of one run."""
    overrides = [
        f"model={args.model}", f"deepspeed={args.zero}", f"storage_path={args.workdir}", "data.workers=0",
        "logger=none", f"cluster.num_workers={workers}", f"cluster.cpus_per_worker={args.cpus_per_worker:g}",
        f"cluster.num_cpus={args.num_cpus}", f"train.max_steps={args.steps}",
        f"train.warmup_steps={min(10, args.steps)}", f"train.log_every={10 ** 6}", f"run.name={run_name}",
    ]
    if args.corpus == "generated":
        overrides += [f"data.sources=[{{name:gen,path:{generated_corpus(args.workdir)}}}]", "data.name=generated"]
    return overrides + list(args.set)


def compose(args, workers: int, run_name: str) -> dict:
    from cluster.config import compose_config

    return compose_config(overrides_for(args, workers, run_name))


def generated_corpus(workdir: Path) -> Path:
    from corpus import make_documents, write_jsonl

    path = workdir / "generated.jsonl"
    if not path.exists():
        write_jsonl(path, make_documents(3000, seed=7))
    return path


def prepare_data(cfg: dict) -> None:
    from data_pipelines.prepare import prepare

    prepare(cfg["data"], cfg["tokenizer"])


KINDS = ("ray", "bare", "local", "bare_concurrent")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 worker, 12 steps, 1 repetition, no local path")
    parser.add_argument("--workers", default="1,2", help="comma-separated cluster.num_workers values")
    parser.add_argument("--steps", type=int, default=None, help="train.max_steps per run (default 30; quick 12)")
    parser.add_argument("--skip", type=int, default=None, help="warm-up steps left out (default 5; quick 3)")
    parser.add_argument("--repeats", type=int, default=None, help="repetitions of each config (default 3; quick 1)")
    parser.add_argument("--model", default="openelm_tiny", help="conf/model option")
    parser.add_argument("--zero", default="zero2", help="conf/deepspeed option (zero0, zero1, zero2, ...)")
    parser.add_argument("--cpus-per-worker", type=float, default=1, help="cluster.cpus_per_worker")
    parser.add_argument("--num-cpus", type=int, default=4, help="cluster.num_cpus of the embedded Ray")
    parser.add_argument("--corpus", choices=["sample", "generated"], default="sample")
    parser.add_argument("--set", action="append", default=[], help="extra config override (every path), repeatable")
    parser.add_argument("--baseline-nice", default="match", help="'match' (the Ray worker's niceness) or a number")
    parser.add_argument("--no-local", action="store_true", help="skip the Ray-free `elmforge train` path")
    parser.add_argument("--no-concurrent", action="store_true", help="skip the N-process bare baseline")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/elmforge-train-overhead"))
    parser.add_argument("--keep-runs", action="store_true", help="keep the run directories")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--_bare", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._bare:
        return bare_main(args._bare)

    workers = [1] if args.quick else [int(w) for w in args.workers.split(",")]
    args.steps = args.steps or (12 if args.quick else 30)
    args.skip = args.skip if args.skip is not None else (3 if args.quick else 5)
    repeats = args.repeats or (1 if args.quick else 3)
    skip_kinds = {"local"} if (args.no_local or args.quick) else set()
    if args.no_concurrent:
        skip_kinds.add("bare_concurrent")
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    stamp = datetime.now().strftime("%m%d-%H%M%S")

    import torch

    print(f"[bench] {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}; model {args.model}, "
          f"{args.zero}, workers {workers}, {args.steps} steps (skip {args.skip}), {repeats} repetitions", flush=True)
    prepare_data(compose(args, workers[0], f"overhead-{stamp}"))

    print("[bench] probing a Ray Train worker's threads and niceness ...", flush=True)
    import ray

    probe = probe_workers(compose(args, workers[0], f"overhead-{stamp}"), args.workdir)
    ray.shutdown()
    threads, worker_nice = probe[0]["torch_threads"], probe[0]["nice"]
    nice = worker_nice if args.baseline_nice == "match" else int(args.baseline_nice)
    print(f"[bench] Ray Train worker: {probe[0]}; bare and local paths: {threads} threads, nice {nice}", flush=True)

    from trainer.flops import flops_per_token
    from trainer.model import OpenELMConfig

    cases = {n: {"cfg": compose(args, n, f"overhead-{stamp}"), **{k: [] for k in KINDS}} for n in workers}
    for rep in range(repeats):
        for n in workers:
            case = cases[n]
            for kind in KINDS if rep % 2 == 0 else reversed(KINDS):
                if kind in skip_kinds or (kind == "bare_concurrent" and n == 1):
                    continue
                print(f"[bench] repetition {rep + 1}/{repeats}, {n} worker(s): {kind} ...", flush=True)
                name = f"overhead-{stamp}-w{n}-r{rep}-{kind}"
                if kind == "ray":
                    r = run_full(compose(args, n, name), args.skip, args.keep_runs)
                elif kind == "local":
                    r = run_local(compose(args, n, name), args.skip, args.keep_runs, threads, nice,
                                  overrides_for(args, n, name))
                else:
                    r = run_bare(case["cfg"], args.steps, args.skip, threads, nice,
                                 n if kind == "bare_concurrent" else 1, args.workdir)
                if kind in ("ray", "local"):
                    print(f"[bench]   {kind}: {r['wall_tok_s_per_worker']:,.0f} tok/s per worker (wall), "
                          f"{r['logged_tok_s_per_worker']:,.0f} (logged), startup {r['startup_s']:.1f}s", flush=True)
                else:
                    print(f"[bench]   {kind}: {r['tok_s']:,.0f} tok/s per process", flush=True)
                case[kind].append(r)

    results = []
    for n, case in cases.items():
        cfg = case["cfg"]
        full = [r["wall_tok_s_per_worker"] for r in case["ray"]]
        logged = [r["logged_tok_s_per_worker"] for r in case["ray"]]
        bare = [r["tok_s"] for r in case["bare"]]
        res = {
            "config": f"{args.model} {args.zero} {n}w x {args.cpus_per_worker:g} cpu, "
                      f"{cfg['train']['micro_batch_size']}x{cfg['data']['seq_len']}",
            "workers": n, "micro_batch_size": cfg["train"]["micro_batch_size"],
            "grad_accum_steps": cfg["train"]["grad_accum_steps"], "seq_len": cfg["data"]["seq_len"],
            "loader_workers": cfg["train"]["loader_workers"], "zero_stage": cfg["deepspeed"]["stage"],
            "full_wall_tok_s_per_worker": spread(full), "full_logged_tok_s_per_worker": spread(logged),
            "bare_tok_s": spread(bare), "ratio": spread([f / b for f, b in zip(full, bare)]),
            "ratio_logged": spread([f / b for f, b in zip(logged, bare)]),
            "outside_step_time_ms": spread([r["outside_step_time_ms_median"] for r in case["ray"]]),
            "full_cpu_ms_per_step": spread([r["cpu_ms_per_step"] for r in case["ray"]]),
            "ray_system_cpu_ms_per_step": spread([r["other_cpu_ms_per_step"] for r in case["ray"]]),
            "bare_cpu_ms_per_step": spread([r["cpu_ms_per_step"] for r in case["bare"]]),
            "cpu_ratio": spread([b["cpu_ms_per_step"] / f["cpu_ms_per_step"] for f, b in zip(case["ray"], case["bare"])]),
            "startup_s": spread([r["startup_s"] for r in case["ray"]]),
            "flops_per_token": flops_per_token(OpenELMConfig(**cfg["model"]), cfg["data"]["seq_len"]),
            "runs": {k: case[k] for k in KINDS},
        }
        if case["local"]:
            local = [r["wall_tok_s_per_worker"] for r in case["local"]]
            res["local_wall_tok_s_per_worker"] = spread(local)
            res["ratio_local"] = spread([x / b for x, b in zip(local, bare)])
            res["local_cpu_ms_per_step"] = spread([r["cpu_ms_per_step"] for r in case["local"]])
            res["cpu_ratio_local"] = spread([b["cpu_ms_per_step"] / x["cpu_ms_per_step"]
                                             for x, b in zip(case["local"], case["bare"])])
        if case["bare_concurrent"]:
            conc = [r["tok_s"] for r in case["bare_concurrent"]]
            res["bare_concurrent_tok_s"] = spread(conc)
            res["ratio_vs_concurrent"] = spread([f / c for f, c in zip(full, conc)])
        res["goal_met"] = res["ratio"]["median"] >= GOAL
        res["goal_met_cpu"] = res["cpu_ratio"]["median"] >= GOAL
        results.append(res)

    def fmt(r: dict, key: str, pattern: str = "{:,.0f}") -> str:
        if key not in r:
            return "-"
        s = r[key]
        if s["n"] == 1:
            return pattern.format(s["median"])
        return f"{pattern.format(s['median'])} ({pattern.format(s['min'])}-{pattern.format(s['max'])})"

    columns = [
        ("config", lambda r: r["config"]),
        ("full path tok/s/worker", lambda r: fmt(r, "full_wall_tok_s_per_worker")),
        ("bare tok/s", lambda r: fmt(r, "bare_tok_s")),
        ("ratio", lambda r: fmt(r, "ratio", "{:.2f}")),
        ("goal", lambda r: f"{GOAL}"),
        ("met?", lambda r: "yes" if r["goal_met"] else "NO"),
        ("met? (CPU)", lambda r: "yes" if r["goal_met_cpu"] else "NO"),
        ("no-Ray tok/s/worker", lambda r: fmt(r, "local_wall_tok_s_per_worker")),
        ("no-Ray ratio", lambda r: fmt(r, "ratio_local", "{:.2f}")),
        ("bare xN at once", lambda r: fmt(r, "bare_concurrent_tok_s")),
        ("ratio vs xN", lambda r: fmt(r, "ratio_vs_concurrent", "{:.2f}")),
        ("CPU ms/step: full", lambda r: fmt(r, "full_cpu_ms_per_step", "{:.0f}")),
        ("no-Ray", lambda r: fmt(r, "local_cpu_ms_per_step", "{:.0f}")),
        ("bare", lambda r: fmt(r, "bare_cpu_ms_per_step", "{:.0f}")),
        ("CPU ratio", lambda r: fmt(r, "cpu_ratio", "{:.2f}")),
        ("no-Ray CPU ratio", lambda r: fmt(r, "cpu_ratio_local", "{:.2f}")),
        ("Ray system CPU ms/step", lambda r: fmt(r, "ray_system_cpu_ms_per_step", "{:.0f}")),
        ("logged tok/s/worker", lambda r: fmt(r, "full_logged_tok_s_per_worker")),
        ("ms/step after step_time", lambda r: fmt(r, "outside_step_time_ms", "{:.1f}")),
        ("GFLOP/s/worker", lambda r: f"{r['full_wall_tok_s_per_worker']['median'] * r['flops_per_token'] / 1e9:.1f}"),
    ]
    rows = [[fn(r) for _, fn in columns] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, (h, _) in enumerate(columns)]
    print()
    print(" | ".join(h.ljust(w) for (h, _), w in zip(columns, widths)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths)))
    print(f"\nmedian (min-max) over repetitions. tok/s from the wall-clock interval between metrics records; "
          f"ratio = full / bare per repetition (runs made next to each other). no-Ray: the same `elmforge train` "
          f"with cluster.launcher=local (torchrun for N > 1). bare xN: N bare processes at once. logged: "
          f"metrics.jsonl tokens_per_s (stops before the loss all-reduces, metrics write and preemption check). "
          f"CPU ms/step: user+system CPU of one worker's processes (with its DataLoader workers) per step; "
          f"CPU ratio = bare / full (the share of the full path's CPU the bare loop needs). Ray system: Ray's "
          f"own processes (GCS, raylet, dashboard, controller, ...) per step. "
          f"Threads {threads}, nice {nice} for every path (a Ray Train worker's).")

    if args.out:
        report = {
            "benchmark": "train_overhead",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "torch": torch.__version__,
                        "load_average_at_end": os.getloadavg()},
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "worker_probe": probe, "threads": threads, "nice": nice,
            "steps": args.steps, "skip": args.skip, "repeats": repeats, "goal": GOAL,
            "results": results,
        }
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"[bench] wrote {args.out}")


if __name__ == "__main__":
    main()

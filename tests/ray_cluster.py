"""A real local Ray cluster for the tests, started once per test session.

``ray start --head --block`` runs in its own process group with 2 CPUs and one fake GPU (so the
GPU scheduling path is exercised on a CPU machine: tasks asking for a GPU are placed on it,
torch still finds no CUDA device and runs on the CPU), on a loopback address and a random port,
with a short temporary folder and usage telemetry off. Drivers connect by its address. It is
torn down by signalling that process group, i.e. only the processes this fixture started (``ray
stop`` would stop every Ray process of the user on the machine, other people's clusters too).
Skipped, with the reason, when Ray is not installed or the cluster does not start.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runs import env

NODE_IP = "127.0.0.2"  # loopback; Ray replaces 127.0.0.1 itself by the machine's outward address
START_TIMEOUT_S = 120


def _ray_cli() -> str | None:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.is_file() else shutil.which("ray")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """The address (HOST:PORT) of the session's Ray cluster."""
    try:
        import ray  # noqa: F401
    except ImportError:
        pytest.skip('Ray is not installed (pip install "medxfer[ray]")')
    cli = _ray_cli()
    if cli is None:
        pytest.skip("the `ray` command is not on the PATH")
    temp = Path(f"/tmp/mxr-{os.getpid()}")
    log_path = temp.with_suffix(".log")
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [cli, "start", "--head", "--block", "--node-ip-address", NODE_IP, "--port", "0", "--num-cpus", "2",
         "--num-gpus", "1", "--object-store-memory", str(100 * 2**20), "--temp-dir", str(temp),
         "--include-dashboard", "false", "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, env=env(), start_new_session=True)
    address = None
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"ray start --address='([^']+)'", log_path.read_text())
        if found:
            address = found.group(1)
            break
        time.sleep(0.5)
    if address is None:
        _stop(proc)
        text = log_path.read_text()[-2000:]
        shutil.rmtree(temp, ignore_errors=True)
        pytest.skip(f"the local Ray cluster did not start: {text}")
    try:
        yield address
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
        log_path.unlink(missing_ok=True)


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process of process group ``pgid`` remains."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the cluster's process group, SIGKILL what is left after a grace period."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _group_alive(proc.pid):
            time.sleep(0.2)
        if not _group_alive(proc.pid):
            break
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass

"""Helpers for tests that start real servers on 127.0.0.1."""

import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, procs: list[subprocess.Popen], log: Path, timeout: float = 180) -> None:
    """Poll `url` until it answers; fail with the server log if a process dies or time runs out."""
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            alive = all(p.poll() is None for p in procs)
            assert alive and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(1)


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()

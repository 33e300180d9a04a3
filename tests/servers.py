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


def serve_in_thread(app, port: int, timeout: float = 60, **config):
    """An ASGI app under uvicorn on 127.0.0.1:`port` in a daemon thread; returns (server, thread) once it listens
    (uvicorn's own `started` flag, polled with a bound). Stop with `server.should_exit = True; thread.join()`."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.time() + timeout
    while not server.started:
        assert time.time() < deadline and t.is_alive(), "server did not start"
        time.sleep(0.02)
    return server, t

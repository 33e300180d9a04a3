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


class FaultyJudge:
    """An OpenAI-compatible /v1/chat/completions (FastAPI under uvicorn, in a thread) that answers deterministic,
    schema-valid verdicts/attributes/pre-checks (hashed from the prompt and seed, so a rerun gets the same answers)
    and injects the faults an endpoint really shows, switched by the test between or during calls:

    - `script`: a list of modes consumed one per request before anything else: "ok", "429" (Retry-After:
      `retry_after`), "500", "503", "timeout" (holds the request `hang_s`), "null" (200 with `{"choices": null}`),
      "html" (200, not JSON), "401";
    - `down`: every request answers `down_status` (set it, or let `down_after` requests pass first, then it is set);
    - `rate_limited_until` (time.monotonic()): until then every request gets 429 with Retry-After = time left;
    - `rpm`: the endpoint's own rate limit (a token bucket of 2 s of budget): beyond it 429 + Retry-After;
    - `latency`: seconds before each answer;
    - `refuse_verdicts`: verdict requests get a refusal (an answer that is invalid for the pair, not a fault).
    It records each request's arrival time, status and Authorization header."""

    def __init__(self, latency: float = 0.0, rpm: float = 0.0):
        import threading

        self.script: list[str] = []
        self.retry_after = 1.0
        self.hang_s = 30.0
        self.down = False
        self.down_status = 503
        self.down_after: int | None = None
        self.rate_limited_until = 0.0
        self.rpm = rpm
        self.latency = latency
        self.refuse_verdicts = False
        self.log: list[tuple[float, int, str]] = []  # (monotonic arrival, status, model)
        self.auth: set[str] = set()
        self.served_ok = 0
        self._bucket = (0.0, 0.0)  # (level, last time)
        self._lock = threading.Lock()
        self.server = None
        self.url = ""

    # --- the answers -----------------------------------------------------------------------------------------
    @staticmethod
    def answer(body: dict) -> str:
        import hashlib
        import json

        prompt = body["messages"][0]["content"]
        h = int(hashlib.sha256(f"{prompt}|{body.get('seed')}".encode()).hexdigest()[:8], 16)
        props = ((body.get("response_format") or {}).get("json_schema") or {}).get("schema", {}).get("properties", {})
        if "task_category" in props:
            return json.dumps({"task_category": ["math", "coding", "advice", "other"][h % 4],
                               "objectivity": "objective" if h % 2 else "subjective", "controversiality": "low",
                               "desired_attributes": ["correct", "clear"],
                               "guideline": "Prefer the correct and clearly explained response."})
        if "reason" in props:
            return json.dumps({"verdict": ["correct", "incorrect", "unsure"][h % 3], "reason": "checked"})
        return json.dumps({"verdict": ["1", "2", "1", "undecidable"][h % 4], "rationale": "hashed"})

    # --- the fault plan --------------------------------------------------------------------------------------
    def _decide(self, now: float) -> tuple[str, float | None]:
        with self._lock:
            if self.script:
                mode = self.script.pop(0)
                return mode, self.retry_after if mode == "429" else None
            if self.down_after is not None and self.served_ok >= self.down_after:
                self.down, self.down_after = True, None
            if self.down:
                return str(self.down_status), None
            if now < self.rate_limited_until:
                return "429", self.rate_limited_until - now
            if self.rpm > 0:
                rate, cap = self.rpm / 60, max(1.0, self.rpm / 30)
                level, last = self._bucket
                level = max(0.0, level - (now - last) * rate)
                if level + 1 > cap:
                    self._bucket = (level, now)
                    return "429", (level + 1 - cap) / rate
                self._bucket = (level + 1, now)
            return "ok", None

    def app(self):
        import asyncio
        import time

        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, PlainTextResponse

        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            now = time.monotonic()
            self.auth.add(request.headers.get("authorization", ""))
            mode, after = self._decide(now)
            status = 200 if mode in ("ok", "null", "html", "timeout") else int(mode)
            self.log.append((now, status, body.get("model", "")))
            if mode == "timeout":
                await asyncio.sleep(self.hang_s)
            if mode == "null":
                return JSONResponse({"choices": None, "usage": None})
            if mode == "html":
                return PlainTextResponse("<html>502 Bad Gateway</html>")
            if status != 200:
                headers = {"Retry-After": f"{after:.3f}"} if after is not None else {}
                return JSONResponse({"error": {"message": f"injected {mode}"}}, status_code=status, headers=headers)
            if self.latency:
                await asyncio.sleep(self.latency)
            with self._lock:
                self.served_ok += 1
            text = self.answer(body)
            if self.refuse_verdicts and '"verdict": "' in text and '"reason"' not in text:
                text = "I'm sorry, but I cannot help with comparing these."
            return {"id": "x", "object": "chat.completion", "model": body.get("model"),
                    "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"} for i in range(body.get("n", 1))],
                    "usage": {"prompt_tokens": len(body["messages"][0]["content"]) // 4, "completion_tokens": 20}}

        return app

    def start(self) -> "FaultyJudge":
        port = free_port()
        self.server, self._thread = serve_in_thread(self.app(), port, limit_concurrency=4096, backlog=4096,
                                                    timeout_graceful_shutdown=1)
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(10)

    def statuses(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for _, s, _ in self.log:
            out[s] = out.get(s, 0) + 1
        return out

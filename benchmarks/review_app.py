"""Review app under 8 concurrent annotator sessions, with a 1k- and a 100k-verdict ledger: items/s served, p50/p99
latency per request (GET /api/next, POST /api/verdicts), and the 100k/1k ratio (the goal: flat).

Peer, measured in the same run: the app as it was before leases and the serving store (`git show
<rev>:pipelines/review/app.py`), which reads the whole queue and ledger on every request and hands every annotator
the same head item. For both, `distinct items/s` counts pairs labelled the number of times they needed; verdicts
beyond that (two people on one single-annotation pair) are counted as `wasted`.

    .venv/bin/python benchmarks/review_app.py                     # ~3 min on 2 cores
    .venv/bin/python benchmarks/review_app.py --seconds 10 --sizes 1000,100000 --no-peer

Each configuration: a fresh lake (the prior verdicts are on an earlier, finished batch, written in 10k-row commits
and compacted, as the app's own compaction leaves a ledger), the server in its own process (uvicorn, one worker),
8 client threads with their own tokens, 3 warm-up cycles each, then `--seconds` of next -> verdict cycles.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.lake import Lake  # noqa: E402
from pipelines.review.app import add_annotator  # noqa: E402
from pipelines.review.ledger import VERDICTS, compact_ledger, verdict_rows, VerdictIn  # noqa: E402
from pipelines.review.queue import QUEUE, QUEUE_SCHEMA  # noqa: E402
from tests.servers import free_port  # noqa: E402

SESSIONS = 8


def _queue(ids: list[str], version: str, overlap_every: int) -> pl.DataFrame:
    n = len(ids)
    return pl.DataFrame({
        "pair_id": ids, "queue_version": [version] * n, "priority": list(range(n)),
        "task_category": ["math"] * n, "objectivity": ["objective"] * n, "controversiality": ["low"] * n,
        "why": ["objective, controversiality=low"] * n, "overlap": [i % overlap_every == 0 for i in range(n)],
        "history": [[{"role": "user", "content": f"What is {i} + 1? " + "context " * 40}] for i in range(n)],
        "chosen": [f"It is {i + 1}. " + "because " * 60 for i in range(n)],
        "rejected": [f"It is {i + 7}. " + "since " * 60 for i in range(n)],
        "label_conflict": [False] * n}, schema=QUEUE_SCHEMA)


def build_lake(root: str, verdicts: int, open_items: int) -> None:
    """An earlier batch fully labelled (2 verdicts per pair) holding `verdicts` ledger rows, and an open batch."""
    lake = Lake(root)
    old = [f"old{i}" for i in range(verdicts // 2)]
    lake.append(QUEUE, _queue(old, "q001", 1).to_arrow())
    lake.append(QUEUE, _queue([f"new{i}" for i in range(open_items)], "q002", 7).to_arrow())
    for start in range(0, len(old), 5000):  # 10k rows a commit
        vs = [VerdictIn(pair_id=p, annotator=f"past{k}", order_shown="chosen_first", choice="1", queue_version="q001",
                        seconds_spent=30.0) for p in old[start:start + 5000] for k in (0, 1)]
        lake.append(VERDICTS, verdict_rows(vs).to_arrow())
    compact_ledger(lake)


SERVER = """
import sys, uvicorn
sys.path.insert(0, {root!r}); sys.path.insert(0, {extra!r})
from {module} import create_app
uvicorn.run(create_app({lake!r}, __import__('pathlib').Path({ann!r})), host='127.0.0.1', port={port},
            log_level='warning')
"""


def run_config(label: str, module: str, extra_path: str, verdicts: int, seconds: float, open_items: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="review-bench-") as tmp:
        lake_root = f"{tmp}/lake"
        t0 = time.perf_counter()
        build_lake(lake_root, verdicts, open_items)
        ann = Path(tmp) / "annotators.json"
        tokens = [add_annotator(ann, f"ann{i}") for i in range(SESSIONS)]
        port = free_port()
        code = SERVER.format(root=str(ROOT), extra=extra_path, module=module, lake=lake_root, ann=str(ann), port=port)
        log = open(f"{tmp}/server.log", "w")
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT))
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, Path(f"{tmp}/server.log").read_text()
                time.sleep(0.2)
            startup = time.perf_counter() - t0
            lat = {"next": [], "verdict": []}
            done: list[str] = []
            lock = threading.Lock()
            barrier = threading.Barrier(SESSIONS + 1)
            stop = threading.Event()

            def session(tok: str) -> None:
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {tok}"},
                                  timeout=120) as c:
                    def cycle(measure: bool) -> bool:
                        t = time.perf_counter()
                        r = c.get("/api/next")
                        t1 = time.perf_counter()
                        r.raise_for_status()
                        item = r.json()["item"]
                        if item is None:
                            return False
                        v = c.post("/api/verdicts", json={"pair_id": item["pair_id"], "order_shown": item["order"],
                                                          "choice": "1", "seconds_spent": 1.0})
                        t2 = time.perf_counter()
                        v.raise_for_status()
                        if measure:
                            with lock:
                                lat["next"].append(t1 - t)
                                lat["verdict"].append(t2 - t1)
                                done.append(item["pair_id"])
                        return True

                    for _ in range(3):
                        cycle(False)
                    barrier.wait()
                    while not stop.is_set():
                        if not cycle(True):
                            break

            threads = [threading.Thread(target=session, args=(t,)) for t in tokens]
            for th in threads:
                th.start()
            barrier.wait()
            t_start = time.perf_counter()
            stop.wait(seconds)
            stop.set()
            for th in threads:
                th.join(300)
            elapsed = time.perf_counter() - t_start
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()
        need = {f"new{i}": 2 if i % 7 == 0 else 1 for i in range(open_items)}
        counts: dict[str, int] = {}
        for p in done:
            counts[p] = counts.get(p, 0) + 1
        useful = sum(min(n, need[p]) for p, n in counts.items())
        both = np.array(lat["next"] + lat["verdict"])
        return {"app": label, "ledger_verdicts": verdicts, "seconds": round(elapsed, 2), "startup_s": round(startup, 1),
                "verdicts": len(done), "verdicts_per_s": len(done) / elapsed,
                "distinct_items_per_s": useful / elapsed, "wasted_verdicts": len(done) - useful,
                "p50_next_ms": float(np.percentile(lat["next"], 50) * 1e3),
                "p99_next_ms": float(np.percentile(lat["next"], 99) * 1e3),
                "p50_verdict_ms": float(np.percentile(lat["verdict"], 50) * 1e3),
                "p99_verdict_ms": float(np.percentile(lat["verdict"], 99) * 1e3),
                "p99_request_ms": float(np.percentile(both, 99) * 1e3)}


def peer_module(rev: str, into: str) -> str | None:
    """The pre-lease app at `rev`, written as a module beside this run (None when git or the file is absent)."""
    r = subprocess.run(["git", "show", f"{rev}:pipelines/review/app.py"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0 or "lease" in r.stdout.lower():
        return None
    Path(into, "review_app_before.py").write_text(r.stdout)
    return "review_app_before"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,100000", help="ledger sizes (verdicts), comma-separated")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured seconds per configuration")
    ap.add_argument("--open-items", type=int, default=4000, help="items in the open batch")
    ap.add_argument("--peer-rev", default="HEAD", help="git revision of the pre-lease app (the peer)")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="review-peer-") as peer_dir:
        apps = [("leases + serving store", "pipelines.review.app", str(ROOT))]
        mod = None if args.no_peer else peer_module(args.peer_rev, peer_dir)
        if mod:
            apps.append((f"before (git {args.peer_rev})", mod, peer_dir))
        elif not args.no_peer:
            print(f"peer: no pre-lease app at git {args.peer_rev}; measuring this app only", flush=True)
        for label, module, extra in apps:
            for n in sizes:
                r = run_config(label, module, extra, n, args.seconds, args.open_items)
                results.append(r)
                print(json.dumps(r), flush=True)
    print(f"\n{SESSIONS} concurrent sessions, {args.seconds:.0f} s each; machine: {os.cpu_count()} cores")
    print(f"{'app':<28}{'ledger':>8}{'items/s':>9}{'verdicts/s':>11}{'wasted':>8}{'p50 next':>10}{'p99 next':>10}"
          f"{'p50 verd':>10}{'p99 verd':>10}{'p99 req':>9}")
    for r in results:
        print(f"{r['app']:<28}{r['ledger_verdicts']:>8}{r['distinct_items_per_s']:>9.1f}{r['verdicts_per_s']:>11.1f}"
              f"{r['wasted_verdicts']:>8}{r['p50_next_ms']:>10.1f}{r['p99_next_ms']:>10.1f}{r['p50_verdict_ms']:>10.1f}"
              f"{r['p99_verdict_ms']:>10.1f}{r['p99_request_ms']:>9.1f}")
    lo, hi = min(sizes), max(sizes)
    for label in dict.fromkeys(r["app"] for r in results):
        a = next(r for r in results if r["app"] == label and r["ledger_verdicts"] == lo)
        b = next(r for r in results if r["app"] == label and r["ledger_verdicts"] == hi)
        print(f"{label}: {hi}/{lo} ratio: items/s x{b['distinct_items_per_s'] / a['distinct_items_per_s']:.2f}, "
              f"p99 request x{b['p99_request_ms'] / a['p99_request_ms']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"sessions": SESSIONS, "results": results}, indent=1))


if __name__ == "__main__":
    main()

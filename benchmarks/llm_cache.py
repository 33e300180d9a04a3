"""LLM cache lookups per work unit: the block-partitioned layout (pipelines/annotate/cache.py) vs the append-only
unpartitioned layout this project had before (the named peer), same rows, same files per chunk.

A run of U units is simulated on the judgments cache as Stage 2 writes it: each unit's pairs (provenance: one shard,
source rows in unit order, a cache block per unit) get 2 judges x 3 samples, appended in chunks of 256 requests; the new layout compacts the
unit's blocks at the end of each call (as judge_pairs does), the peer appends chunk files only. Before each unit is
written, its lookup (`done_keys`, the call judge_pairs makes) is timed on both tables; then all units are looked
up again on the full tables (a rerun). Prints unit 2's and unit U's lookup (unit 1's table is empty), the ratio
between them (goal: flat, < 1.2x), and the peer's.

    python benchmarks/llm_cache.py --units 40 --unit-rows 2000
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def unit_frames(units: int, unit_rows: int):
    import polars as pl

    for u in range(units):
        rows = range(u * unit_rows, (u + 1) * unit_rows)
        yield pl.DataFrame({"pair_id": [hashlib.sha256(f"p{r}".encode()).hexdigest()[:32] for r in rows],
                            "shard": ["landing/shard-0.parquet"] * unit_rows, "source_row": list(rows)})


def judgment_chunks(pairs, judges=("judge-a", "judge-b"), samples=3, chunk=256):
    """Rows as judge_pairs writes them: per judge, requests (pair, sample) in chunks of `chunk`."""
    import polars as pl

    from pipelines.annotate.judging import JUDGMENT_SCHEMA

    now = datetime.now(timezone.utc)
    todo = [(r, s) for r in pairs.iter_rows(named=True) for s in range(samples)]
    for judge in judges:
        for i in range(0, len(todo), chunk):
            part = todo[i:i + chunk]
            rows = [{"pair_id": r["pair_id"], "model": judge, "prompt_version": "judge_v1@bench", "sample": s,
                     "sampling": "t=0.7,seed=0", "context": "stage2", "order_shown": "chosen_first",
                     "verdict_raw": "1", "prefers": "chosen", "rationale": "because", "raw_output": "{}",
                     "status": "ok", "error": None, "attempts": 1, "n_exemplars": 4, "tokens_in": 900,
                     "tokens_out": 40, "label_origin": "llm", "run_id": "bench", "created_at": now}
                    for r, s in part]
            yield pl.DataFrame(rows, schema=JUDGMENT_SCHEMA), [r for r, _ in part]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=40)
    ap.add_argument("--unit-rows", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3, help="each lookup is timed this many times; the median counts")
    a = ap.parse_args()
    from pipelines.annotate import cache
    from pipelines.annotate.cache import cache_append, compact
    from pipelines.annotate.cache import done_keys, with_parts
    from pipelines.lake import Lake

    lake = Lake(tempfile.mkdtemp(prefix="llm-cache-"))
    # The block is scaled to the unit so this small run has a block per unit, as a production unit (50k rows) has
    # its own 5 blocks of 10k: the layout is the same, only the constant differs.
    cache.CACHE_BLOCK_ROWS = a.unit_rows

    def lookup(table: str, pairs) -> float:
        times = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            for judge in ("judge-a", "judge-b"):
                done_keys(lake, table, judge, "judge_v1@bench", pairs, ["sample", "sampling"])
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    during = {"blocks": [], "peer": []}
    units = list(unit_frames(a.units, a.unit_rows))
    t_build = time.perf_counter()
    for u, pairs in enumerate(units):
        if u:
            during["blocks"].append(lookup("judgments_blocks", pairs))
            during["peer"].append(lookup("judgments_peer", pairs))
        written: list[str] = []
        for rows, part in judgment_chunks(pairs):
            cache_append(lake, "judgments_blocks", with_parts(rows, part), written)
            lake.append("judgments_peer", rows)
        compact(lake, "judgments_blocks", written)
    t_build = time.perf_counter() - t_build
    rerun = {t: [lookup(f"judgments_{t}", units[i]) for i in (0, len(units) - 1)] for t in ("blocks", "peer")}
    n_rows = lake.scan("judgments_peer").select("pair_id").collect().height
    files = {t: len(lake.delta(f"judgments_{t}").file_uris()) for t in ("blocks", "peer")}
    print(f"{a.units} units x {a.unit_rows} pairs, 2 judges x 3 samples: {n_rows:,} cache rows; files: "
          f"blocks {files['blocks']:,}, peer {files['peer']:,}; build {t_build:.0f} s")
    for t, name in (("blocks", "block-partitioned (ours)"), ("peer", "append-only (before)")):
        d2, dn = during[t][0], during[t][-1]
        r1, rn = rerun[t]
        print(f"{name:26s} lookup during the run: unit 2 {1e3 * d2:7.1f} ms, unit {a.units} {1e3 * dn:7.1f} ms "
              f"({dn / d2:.2f}x); rerun: unit 1 {1e3 * r1:7.1f} ms, unit {a.units} {1e3 * rn:7.1f} ms "
              f"({rn / r1:.2f}x)")
    print(f"unit {a.units} lookup, peer / ours: {during['peer'][-1] / during['blocks'][-1]:.1f}x during the run, "
          f"{rerun['peer'][1] / rerun['blocks'][1]:.1f}x on a rerun")


if __name__ == "__main__":
    main()

"""Ingest benchmark: parse + check + dedup + Delta write of N synthetic ~1 KB pairs, SynPref vs a pandas baseline.

Each side runs in its own subprocess on the same JSONL file, so its memory is its own: peak USS (private memory,
sampled every 0.1 s; shared library pages are not counted) with ru_maxrss beside it. Prints pairs/s, peak USS and
the ratios. The pandas peer is the straightforward implementation: read_json(lines) -> hash each
row -> drop_duplicates -> write_deltalake.

    python benchmarks/ingest.py --n 1000000           # default N = 1M
    python benchmarks/ingest.py --n 1000000 --repeat 3  # ours and pandas alternated 3 times: median ratio
    python benchmarks/ingest.py --n 100000 --n 1000000  # USS growth between two sizes (ours only)
    python benchmarks/ingest.py --n 4000000 --shards 40 --no-pandas  # does pairs/s fall as shards accumulate?

With --shards K the N pairs land as K files (duplicates across shards included) and are ingested one after
another into one lake with one dedup index for the run, as the raw_pairs asset does in a backfill; pairs/s is
printed per shard, and the first and last quarter are compared.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks.rm_data_scale (TreeUSS) when run as a script

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()


def make_file(path: Path, n: int, dup_rate: float = 0.05, seed: int = 0, prompt_words: int = 40,
              response_words: int = 60) -> None:
    rng = random.Random(seed)
    with path.open("w") as fh:
        prev = []
        for i in range(n):
            if prev and rng.random() < dup_rate:
                fh.write(rng.choice(prev))
                continue
            prompt = f"q{i} " + " ".join(rng.choices(WORDS, k=prompt_words))
            rec = {"prompt": prompt, "chosen": " ".join(rng.choices(WORDS, k=response_words)),
                   "rejected": " ".join(rng.choices(WORDS, k=response_words))}
            line = json.dumps(rec) + "\n"
            if len(prev) < 1000:
                prev.append(line)
            fh.write(line)


def run_ours(path: str, out: str) -> dict:
    from pipelines.ingest.run import ingest_shard
    from pipelines.lake import Lake

    t = time.perf_counter()
    rep = ingest_shard(Lake(out), path, source="bench", shard="bench/0", run_id="bench", batch_size=100_000)
    dt = time.perf_counter() - t
    assert rep.reconciles
    return {"pairs": rep.candidates, "kept": rep.kept, "seconds": dt}


def run_pandas(path: str, out: str) -> dict:
    import pandas as pd
    import xxhash
    from deltalake import write_deltalake

    t = time.perf_counter()
    df = pd.read_json(path, lines=True)
    df["pair_id"] = [xxhash.xxh3_128_hexdigest(json.dumps([p, c, r]).encode())  # the same hash as SynPref's
                     for p, c, r in zip(df["prompt"], df["chosen"], df["rejected"])]
    n = len(df)
    df = df.dropna().loc[lambda d: d["chosen"] != d["rejected"]].drop_duplicates("pair_id")
    write_deltalake(out + "/raw_pairs", df)
    return {"pairs": n, "kept": len(df), "seconds": time.perf_counter() - t}


def run_shards(folder: str, out: str) -> dict:
    """Every shard of `folder` in name order into one lake, with one index (the raw_pairs asset's loop)."""
    from pipelines.ingest.run import ingest_shard, load_id_index
    from pipelines.lake import Lake

    lake = Lake(out)
    index = load_id_index(lake)
    per, total, t0 = [], 0, time.perf_counter()
    for i, f in enumerate(sorted(Path(folder).glob("*.jsonl"))):
        t = time.perf_counter()
        rep = ingest_shard(lake, str(f), source="bench", shard=f"bench/{f.name}", run_id="bench",
                           batch_size=100_000, id_index=index)
        assert rep.reconciles
        per.append(rep.candidates / (time.perf_counter() - t))
        total += rep.candidates
    return {"pairs": total, "seconds": time.perf_counter() - t0, "per_shard": per, "indexed": len(index)}


def child(which: str, path: str) -> None:
    from benchmarks.rm_data_scale import TreeUSS

    with tempfile.TemporaryDirectory() as d, TreeUSS(every=0.1) as mem:
        res = {"ours": run_ours, "pandas": run_pandas, "shards": run_shards}[which](path, d)
    res["peak_uss_mb"] = mem.peak / 2**20
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(res))


def measure(which: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", which, str(path)], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, action="append")
    ap.add_argument("--child", nargs=2)
    ap.add_argument("--no-pandas", action="store_true")
    ap.add_argument("--shards", type=int, default=0, help="land the pairs as this many files (see above)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run ours and pandas alternately this many times on the first size and report the median "
                         "ratio (this box drifts by +-15%% within minutes: one sample each is not a ratio)")
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return
    if a.shards:
        with tempfile.TemporaryDirectory() as d:
            n = (a.n or [1_000_000])[0]
            for k in range(a.shards):  # a different seed per shard; duplicates also across shards (same q ids)
                make_file(Path(d) / f"shard-{k:03d}.jsonl", n // a.shards, seed=k % max(1, a.shards // 2))
            r = measure("shards", Path(d))
        q = max(1, a.shards // 4)
        first, last = r["per_shard"][:q], r["per_shard"][-q:]
        print(f"N={r['pairs']:,} in {a.shards} shards, one index ({r['indexed']:,} ids at the end): "
              f"{r['pairs'] / r['seconds']:,.0f} pairs/s overall; first {q} shards {sum(first) / q:,.0f} pairs/s, "
              f"last {q} {sum(last) / q:,.0f} pairs/s (last / first = {sum(last) / sum(first):.2f}); peak USS "
              f"{r['peak_uss_mb']:,.0f} MB (RSS {r['peak_rss_mb']:,.0f})")
        return
    sizes = a.n or [1_000_000]
    with tempfile.TemporaryDirectory() as d:
        results = {}
        for n in sizes:
            p = Path(d) / f"pairs-{n}.jsonl"
            make_file(p, n)
            mb = p.stat().st_size / n
            ours = measure("ours", p)
            line = (f"N={n:,} ({mb:.0f} B/pair)  synpref: {ours['pairs'] / ours['seconds']:,.0f} pairs/s, "
                    f"peak USS {ours['peak_uss_mb']:,.0f} MB (RSS {ours['peak_rss_mb']:,.0f})")
            if not a.no_pandas and n == sizes[0]:
                pd_ = measure("pandas", p)
                line += (f"  |  pandas: {pd_['pairs'] / pd_['seconds']:,.0f} pairs/s, peak USS "
                         f"{pd_['peak_uss_mb']:,.0f} MB (RSS {pd_['peak_rss_mb']:,.0f})  |  "
                         f"speed ratio synpref/pandas = "
                         f"{(ours['pairs'] / ours['seconds']) / (pd_['pairs'] / pd_['seconds']):.2f}x, "
                         f"USS ratio = {ours['peak_uss_mb'] / pd_['peak_uss_mb']:.2f}")
                pairs = [(ours, pd_)]
                for _ in range(a.repeat - 1):
                    print(line, flush=True)
                    o, q = measure("ours", p), measure("pandas", p)
                    pairs.append((o, q))
                    line = (f"N={n:,} again  synpref: {o['pairs'] / o['seconds']:,.0f} pairs/s  |  pandas: "
                            f"{q['pairs'] / q['seconds']:,.0f} pairs/s  |  ratio {q['seconds'] / o['seconds']:.2f}x")
                if a.repeat > 1:
                    rates = sorted(o["pairs"] / o["seconds"] for o, _ in pairs)
                    ratios = sorted(q["seconds"] / o["seconds"] for o, q in pairs)
                    print(line, flush=True)
                    line = (f"N={n:,} over {a.repeat} alternated runs: synpref median {rates[len(rates) // 2]:,.0f} "
                            f"pairs/s (min {rates[0]:,.0f}, max {rates[-1]:,.0f}); median ratio synpref/pandas "
                            f"{ratios[len(ratios) // 2]:.2f}x (min {ratios[0]:.2f}x, max {ratios[-1]:.2f}x)")
            print(line, flush=True)
            results[n] = ours
            p.unlink()
        if len(sizes) > 1:
            a_, b_ = results[sizes[0]], results[sizes[-1]]
            print(f"peak USS growth {sizes[0]:,} -> {sizes[-1]:,}: "
                  f"{100 * (b_['peak_uss_mb'] / a_['peak_uss_mb'] - 1):.1f}%")


if __name__ == "__main__":
    main()

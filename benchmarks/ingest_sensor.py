"""Ingest through the landing sensor as the lake grows: per-shard time, old path vs new path, same benchmark run.

Shards land in waves (`--wave` files per sensor tick). Each tick the landing sensor is evaluated the way the
daemon evaluates it (`dg.build_sensor_context` on a real instance) and every RunRequest it returns is executed
(`ingest_job.execute_in_process` with the request's partition key or range tags):

- old: the previous sensor (one run per new shard) and the previous asset (each run rebuilt the dedup index by
  scanning every id of raw_pairs), reproduced here by swapping `assets.ingest.IdStore` for a scan-every-run one;
- new: jobs/ingest.py as shipped (one run per tick over the new shards' range) on the persisted index.

Per-shard time = a run's wall time / the shards it ingested. Each mode runs in its own subprocess and lake.

    python benchmarks/ingest_sensor.py --shards 40 --pairs 5000 --wave 10 --base 300000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def child(mode: str, shards_dir: str, base_file: str, wave: int) -> dict:
    import dagster as dg

    home = Path(tempfile.mkdtemp(prefix=f"ingest-sensor-{mode}-"))
    os.environ["SYNPREF_HOME"] = str(home)
    os.environ.pop("SYNPREF_LAKE_ROOT", None)
    landing = home / "landing" / "bench"
    landing.mkdir(parents=True)
    os.environ["SYNPREF_LANDING_ROOT"] = str(home / "landing")

    import assets.ingest as ai
    from definitions import defs
    from jobs.ingest import landing_sensor
    from pipelines.ingest.idstore import IdStore
    from pipelines.ingest.run import ingest_shard, load_id_index
    from resources.lake import LakeResource

    lake = LakeResource().lake()
    t = time.perf_counter()
    if base_file:  # the lake at scale before the timed shards land (built by the same code as the mode's runs)
        store = IdStore(lake)
        index = store.open()
        rep = ingest_shard(lake, base_file, source="base", shard="base/0", run_id="base", id_index=index,
                           batch_size=100_000)
        store.commit(index, rep.version)
    base_s = time.perf_counter() - t

    if mode == "old":
        class ScanEveryRun:  # the asset before the persisted index: `index = load_id_index(lake)` each run
            def __init__(self, lake):
                self.lake, self.rebuilt = lake, True

            def open(self):
                return load_id_index(self.lake)

            def commit(self, index, version):
                pass

        ai.IdStore = ScanEveryRun

    opens: list[float] = []  # the index-open share of each run (a scan of every id in the old path)
    inner = ai.IdStore

    class TimedOpen(inner):
        def open(self):
            t = time.perf_counter()
            try:
                return super().open()
            finally:
                opens.append(time.perf_counter() - t)

    ai.IdStore = TimedOpen
    job = defs.resolve_job_def("ingest_job")
    files = sorted(Path(shards_dir).glob("*.jsonl"))
    per_shard: list[float] = []
    runs = 0
    with dg.instance_for_test() as instance:
        for w in range(0, len(files), wave):
            for f in files[w:w + wave]:
                os.link(f, landing / f.name)  # the shard lands
            ctx = dg.build_sensor_context(instance=instance, resources={"lake_store": LakeResource()})
            res = landing_sensor(ctx)
            new = res.dynamic_partitions_requests[0].partition_keys
            instance.add_dynamic_partitions("raw_shards", new)
            reqs = ([dg.RunRequest(partition_key=k, run_key=f"ingest:{k}") for k in new] if mode == "old"
                    else res.run_requests)  # old: the previous sensor's one RunRequest per shard
            for r in reqs:
                t = time.perf_counter()
                out = job.execute_in_process(instance=instance, partition_key=r.partition_key, tags=r.tags)
                dt = time.perf_counter() - t
                assert out.success
                n = out.asset_materializations_for_node("raw_pairs")[0].metadata["shards"].value
                assert out.asset_materializations_for_node("raw_pairs")[0].metadata["kept"].value > 0
                per_shard += [dt / n] * n
                runs += 1
        rows = lake.read("raw_pairs", columns=["pair_id"]).height
    return {"mode": mode, "runs": runs, "per_shard_s": per_shard, "rows": rows, "base_s": base_s, "opens": opens}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=40)
    ap.add_argument("--pairs", type=int, default=5000, help="pairs per landed shard")
    ap.add_argument("--wave", type=int, default=10, help="shards landing per sensor tick")
    ap.add_argument("--base", type=int, default=0, help="pairs already in the lake before the shards land")
    ap.add_argument("--child", nargs=4)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.child[2], int(a.child[3]))))
        return
    from benchmarks.ingest import make_file

    with tempfile.TemporaryDirectory() as d:
        shards = Path(d) / "shards"
        shards.mkdir()
        for i in range(a.shards):
            make_file(shards / f"s-{i:03d}.jsonl", a.pairs, seed=1000 + i, prompt_words=20, response_words=30)
        base = ""
        if a.base:
            base = str(Path(d) / "base.jsonl")
            make_file(Path(base), a.base, seed=7, prompt_words=20, response_words=30)
        results = {}
        for mode in ("old", "new"):
            t = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, "--child", mode, str(shards), base, str(a.wave)],
                                 capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
            if out.returncode:
                sys.exit(out.stderr[-4000:])
            results[mode] = {**json.loads(out.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - t}
    q = max(1, a.wave)
    print(f"{a.shards} shards x {a.pairs} pairs, {a.wave} per tick, base lake {a.base} pairs")
    print("mode  runs  rows     first-wave s/shard  last-wave s/shard  last/first  total s  index open s (first/last run)")
    for mode, r in results.items():
        p = r["per_shard_s"]
        first, last = statistics.mean(p[:q]), statistics.mean(p[-q:])
        print(f"{mode:<5} {r['runs']:>4}  {r['rows']:>7}  {first:>18.3f}  {last:>17.3f}  {last / first:>10.2f}"
              f"  {sum(p):>7.1f}  {r['opens'][0]:.3f} / {r['opens'][-1]:.3f}")
    assert results["old"]["rows"] == results["new"]["rows"]


if __name__ == "__main__":
    main()

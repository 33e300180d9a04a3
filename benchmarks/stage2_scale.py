"""Stage 2 at scale: time and memory of the shard-at-a-time Stage 2 (pipelines.curate.stage2.run_stage2) on a local
Ray, against the whole-table path this project had before (kept below as `legacy_stage2`, the named peer).

Data: N project-made pairs (benchmarks/ingest.py's generator: unique TRL rows, by default an 8-word prompt and
12-word responses, ~120 tokens a sequence under the tiny tokenizer), ingested with the product's ingest; a small random-init decoder (built locally, fresh score head scaled so rewards spread) plays both RMs, so
the RM costs little and the plumbing shows; the simulated judge answers for the unconfident pairs. Every run is its
own process, so peak RSS (ru_maxrss of the driver, plus the largest sampled sum over Ray's worker processes) is its
own.

    python benchmarks/stage2_scale.py --n 100000 --n 1000000 --n 4000000 --peer-max 1000000

Prints, per N and path: pairs/s end to end and per step (read+score, annotate+judge, keep+commit), peak RSS, and
the share of pairs that skipped annotation; with --trace, the driver's memory by mapping after every unit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_rm(path: Path, seed: int) -> str:
    """A 2-layer, 64-wide random decoder whose score head is scaled up: random rewards spread, so some pairs are
    confident and skip the LLM, as a trained RM would make most of them."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from pipelines.rm.tiny import build_tiny_decoder

    build_tiny_decoder(path, "qwen3", seed=seed, hidden=64, layers=1)
    m = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    torch.manual_seed(seed)
    with torch.no_grad():
        m.score.weight.normal_(0.0, 0.5)
    m.save_pretrained(path)
    return str(path)


def prepare(work: Path, n: int, prompt_words: int, response_words: int) -> dict:
    from benchmarks.ingest import make_file
    from pipelines.ingest.run import ingest_shard
    from pipelines.lake import Lake

    lake = Lake(str(work / "lake"))
    shard_rows = 250_000
    t = time.perf_counter()
    for s in range(0, n, shard_rows):
        f = work / f"shard-{s // shard_rows:03d}.jsonl"
        make_file(f, min(shard_rows, n - s), dup_rate=0.0, seed=s, prompt_words=prompt_words,
                  response_words=response_words)
        ingest_shard(lake, str(f), source="bench", shard=f"bench/{f.name}", run_id="prep", batch_size=100_000)
        f.unlink()
    return {"ingest_s": time.perf_counter() - t, "rms": [build_rm(work / "rm_a", 1), build_rm(work / "rm_b", 2)]}


def _inputs(work: Path, rms: list[str]):
    from pipelines.annotate.backends import SimulatedBackend
    from pipelines.annotate.prompts import load_prompt
    from pipelines.curate.judge import JudgeSetup
    from pipelines.curate.stage2 import Stage2Inputs
    from pipelines.rm.registry import ModelRef

    judges = [SimulatedBackend(name="judge-a"), SimulatedBackend(name="judge-b")]
    return Stage2Inputs(best=ModelRef("best:1", rms[0], "", str(work / "cache")),
                        gold=ModelRef("gold:1", rms[1], "", str(work / "cache")),
                        annotator=SimulatedBackend(name="annotator"), attributes_prompt=load_prompt("attributes_v1"),
                        judging=JudgeSetup(judges=judges, prompt=load_prompt("judge_v1"), samples=1, chunk=4096))


class RSSWatch:
    """Samples, every 0.5 s, the summed RSS of this process's children (Ray's workers) and this process's own
    private memory (USS: pages no other process maps). ru_maxrss also counts the shared pages of Ray's object store
    that the driver touched while reading blocks zero-copy, so on the Ray path it grows with the data read up to the
    store's size. USS has two parts that are not the driver's own allocations either: object-store pages the driver
    read (private once the worker that wrote them exits) and shared-library pages (torch, arrow, ...) that become
    private to the driver when Ray's workers, which mapped the same files, exit at the end of the pipeline. So every
    2 s it also sums the driver's private ANONYMOUS pages (heap, arenas, stacks: what the driver's code allocated),
    and keeps that peak apart. Keeps the peaks."""

    def __init__(self):
        import psutil

        self.me, self.peak, self.peak_uss, self.peak_anon, self._stop = psutil.Process(), 0, 0, 0, threading.Event()
        self.uss_parts: dict[str, int] = {}  # at the USS peak: private MB by kind of mapping
        self._t = threading.Thread(target=self._run, daemon=True)

    def private_by_kind(self) -> dict[str, int]:
        """Private bytes (clean + dirty) of this process by mapping: anon (no file, [heap], [stack]), shm (Ray's
        object store under /dev/shm), file (libraries and other mapped files)."""
        out = {"anon": 0, "shm": 0, "file": 0}
        for m in self.me.memory_maps(grouped=True):
            kind = ("anon" if not m.path or m.path.startswith("[") else
                    "shm" if m.path.startswith("/dev/shm") or "plasma" in m.path else "file")
            out[kind] += m.private_clean + m.private_dirty
        return out

    def unit_line(self, row: dict) -> None:
        """--trace: one line per committed unit with the driver's private memory by mapping (where a step in
        USS comes from: the driver's allocations, object-store pages or library pages)."""
        parts = {k: v // 2**20 for k, v in self.private_by_kind().items()}
        print(f"UNIT {row['work_unit']} uss={self.me.memory_full_info().uss // 2**20} MB private by mapping "
              f"{parts} MB threads={self.me.num_threads()}", flush=True)

    def _run(self):
        import psutil

        k = 0
        while not self._stop.wait(0.5):
            try:
                uss = self.me.memory_full_info().uss
                if uss > self.peak_uss or k % 4 == 0:
                    parts = self.private_by_kind()
                    self.peak_anon = max(self.peak_anon, parts["anon"])
                    if uss > self.peak_uss:
                        self.uss_parts = {kk: v // 2**20 for kk, v in parts.items()}
                self.peak_uss = max(self.peak_uss, uss)
                self.peak = max(self.peak, sum(c.memory_info().rss for c in self.me.children(recursive=True)))
            except psutil.Error:  # a worker exited between listing and reading it: skip this sample
                continue
            k += 1

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join()


def run_ours(work: Path, rms: list[str], unit_rows: int, max_len: int, ray_engine: bool = True,
             watch: "RSSWatch | None" = None, actors: int = 0, cpus: int = 0) -> dict:
    import ray

    from pipelines.compute import InProcessEngine, RayEngine
    from pipelines.curate.stage2 import Stage2Config, run_stage2
    from pipelines.lake import Lake

    if ray_engine:
        ray.init(num_cpus=cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False)
        # actors=0 is ComputeResource's default (one actor per model on CPUs): what `make demo` runs
        engine = RayEngine(actors=actors, batch_rows=2048, max_len=max_len, batch_size=128)
    else:
        engine = InProcessEngine(max_len=max_len, batch_size=128, rows_per_batch=2048)
    t = time.perf_counter()
    rep = run_stage2(Lake(str(work / "lake")), Stage2Config(confidence_margin=0.1, unit_rows=unit_rows,
                                                             stage1_fraction=0.0, include_stage1=False,
                                                             annotate_chunk=4096),
                     _inputs(work, rms), engine, run_id="bench", on_unit=watch.unit_line if watch else None)
    dt = time.perf_counter() - t
    if ray_engine:
        ray.shutdown()
    assert rep.reconciles
    return {"pairs": rep.pool, "seconds": dt, "steps": rep.step_seconds, "skipped_annotation": rep.skipped_annotation_share,
            "units": rep.units_run}


def legacy_stage2(work: Path, rms: list[str], max_len: int) -> dict:
    """The whole-table path of the previous code (assets/curate.py before this change), condensed: annotate every
    pair, score the whole pool from to_dicts() in one process keeping every score in memory, one write at the end,
    then judge the unconfident and apply the keep rule over the whole pool in one frame."""
    import polars as pl

    from pipelines.annotate.attributes import annotate_attributes
    from pipelines.annotate.judging import aggregate_judgments, judge_pairs
    from pipelines.curate.stage2 import keep_rule, split_confident
    from pipelines.lake import Lake
    from pipelines.rm.model import load_reward_model
    from pipelines.rm.score import score_rows

    inputs = _inputs(work, rms)
    lake = Lake(str(work / "lake"))
    steps = {}
    t0 = time.perf_counter()
    pool = lake.read("raw_pairs", columns=["pair_id", "history", "chosen", "rejected"])
    annotate_attributes(lake, pool, inputs.annotator, inputs.attributes_prompt, "legacy", chunk=4096)
    steps["annotate_all"] = time.perf_counter() - t0
    t = time.perf_counter()
    rows = pool.to_dicts()
    best, _ = score_rows(load_reward_model(rms[0]), rows, "best:1", max_len=max_len, batch_size=128)
    gold, _ = score_rows(load_reward_model(rms[1]), rows, "gold:1", max_len=max_len, batch_size=128)
    lake.upsert("rm_scores", pl.concat([best, gold]).to_arrow(), keys=["pair_id", "rm_version"])
    steps["score"] = time.perf_counter() - t
    t = time.perf_counter()
    _, unconf = split_confident(best, 0.1)
    to_judge = pool.filter(pl.col("pair_id").is_in(unconf["pair_id"].to_list()))
    judge_pairs(lake, to_judge, inputs.judging.judges, inputs.judging.prompt, "legacy", samples=1, chunk=4096)
    agg = aggregate_judgments(lake.read("llm_judgments"))
    steps["judge"] = time.perf_counter() - t
    t = time.perf_counter()
    curated, recycled = keep_rule(pool, best, gold, agg, margin=0.1, best_version="best:1", gold_version="gold:1",
                                  judge_version="j")
    lake.overwrite("curated_pairs", curated.to_arrow())
    lake.overwrite("recycled_pairs", recycled.to_arrow())
    steps["keep_commit"] = time.perf_counter() - t
    return {"pairs": pool.height, "seconds": time.perf_counter() - t0, "steps": steps,
            "skipped_annotation": 0.0, "units": 1}


def child(args) -> None:
    work = Path(args.work)
    meta = json.loads((work / "meta.json").read_text())
    with RSSWatch() as watch:
        out = (legacy_stage2(work, meta["rms"], args.max_len) if args.path == "legacy"
               else run_ours(work, meta["rms"], args.unit_rows, args.max_len, ray_engine=args.path == "ours",
                             watch=watch if args.trace else None, actors=args.actors, cpus=args.cpus))
    out["workers_peak_mb"], out["driver_peak_uss_mb"] = watch.peak / 2**20, watch.peak_uss / 2**20
    out["driver_peak_anon_mb"], out["driver_uss_parts_mb"] = watch.peak_anon / 2**20, watch.uss_parts
    out["driver_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, action="append")
    ap.add_argument("--peer-max", type=int, default=1_000_000, help="largest N the whole-table peer runs at")
    ap.add_argument("--unit-rows", type=int, default=50_000)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--prompt-words", type=int, default=8)
    ap.add_argument("--response-words", type=int, default=12)
    ap.add_argument("--paths", default="ours,ours-inprocess,legacy")
    ap.add_argument("--child", choices=["ours", "ours-inprocess", "legacy"])
    ap.add_argument("--work")
    ap.add_argument("--trace", action="store_true", help="print the driver's memory by mapping after every unit")
    ap.add_argument("--actors", type=int, default=0, help="RayEngine actors per model (0 = the product default)")
    ap.add_argument("--cpus", type=int, default=0, help="CPUs of the local Ray (0 = every core)")
    a = ap.parse_args()
    if a.child:
        a.path = a.child
        return child(a)
    rows = []
    for n in a.n or [100_000]:
        for path in a.paths.split(","):
            if path == "legacy" and n > a.peer_max:
                continue
            with tempfile.TemporaryDirectory(prefix=f"s2-{n}-") as d:
                work = Path(d)
                meta = prepare(work, n, a.prompt_words, a.response_words)
                (work / "meta.json").write_text(json.dumps(meta))
                env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                       "TRANSFORMERS_VERBOSITY": "error"}
                out = subprocess.run([sys.executable, __file__, "--child", path, "--work", d, "--unit-rows",
                                      str(a.unit_rows), "--max-len", str(a.max_len), "--actors", str(a.actors), "--cpus", str(a.cpus),
                                      *(["--trace"] if a.trace else [])],
                                     env=env, capture_output=True, text=True)
                for x in out.stdout.splitlines():
                    if x.startswith("UNIT "):
                        print(f"N={n:,} {path} {x}")
                line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    print("\n".join(x for x in out.stderr.splitlines() if "Error" in x or "error" in x)[-3000:])
                    raise SystemExit(f"{path} at N={n} failed")
                r = {"n": n, "path": path, **json.loads(line[len("RESULT "):])}
                rows.append(r)
                steps = ", ".join(f"{k} {r['pairs'] / max(v, 1e-9):,.0f}/s" for k, v in r["steps"].items())
                print(f"N={n:>9,} {path:15s}: {r['pairs'] / r['seconds']:>8,.0f} pairs/s end to end ({r['seconds']:.0f} s; "
                      f"{steps}); driver peak RSS {r['driver_peak_mb']:,.0f} MB (private {r['driver_peak_uss_mb']:,.0f} MB = "
                      f"{r['driver_uss_parts_mb']} MB by mapping; private anonymous peak "
                      f"{r['driver_peak_anon_mb']:,.0f} MB), Ray workers {r['workers_peak_mb']:,.0f} MB; "
                      f"skipped annotation {100 * r['skipped_annotation']:.1f}%; units {r['units']}", flush=True)
    by = {(r["n"], r["path"]): r for r in rows}
    for n in a.n or []:
        for path in ("ours", "ours-inprocess"):
            if (n, "legacy") in by and (n, path) in by:
                o, p = by[(n, path)], by[(n, "legacy")]
                print(f"N={n:,}: {path} / legacy pairs/s = "
                      f"{(o['pairs'] / o['seconds']) / (p['pairs'] / p['seconds']):.2f}x; "
                      f"driver peak RSS {o['driver_peak_mb']:,.0f} vs {p['driver_peak_mb']:,.0f} MB, private "
                      f"{o['driver_peak_uss_mb']:,.0f} vs {p['driver_peak_uss_mb']:,.0f} MB")
    for n in a.n or [100_000]:
        if (n, "ours") in by and (n, "ours-inprocess") in by:
            o, p = by[(n, "ours")], by[(n, "ours-inprocess")]
            print(f"N={n:,}: Ray engine ({o['units']} units, actors={a.actors or 'default'}) / in-process pairs/s = "
                  f"{(o['pairs'] / o['seconds']) / (p['pairs'] / p['seconds']):.2f}x")
    for path in ("ours", "ours-inprocess"):
        mine = sorted((r for r in rows if r["path"] == path), key=lambda r: r["n"])
        if len(mine) >= 2:
            lo, hi = mine[-2], mine[-1]
            print(f"{path}: driver peak RSS {lo['n']:,} -> {hi['n']:,}: "
                  f"{100 * (hi['driver_peak_mb'] / lo['driver_peak_mb'] - 1):+.1f}%, private "
                  f"{100 * (hi['driver_peak_uss_mb'] / lo['driver_peak_uss_mb'] - 1):+.1f}%, private anonymous "
                  f"{100 * (hi['driver_peak_anon_mb'] / lo['driver_peak_anon_mb'] - 1):+.1f}%")


if __name__ == "__main__":
    main()

"""Time to resume RM training after kill -9, on a large token store (issue 32: "time to resume after kill -9 at 1M
pairs").

A token store of N synthetic pairs (default 1M) on the tiny Qwen3 of pipelines/rm/tiny.py; `torchrun` with 2 gloo
ranks on CPU, max_len 512, global batch 64, a checkpoint every 2 steps (async DCP), max_steps 4. The killed run is
rank 0 shot by SIGKILL right after step 3, once the step-2 checkpoint is committed (tests/kill_launch.py, the crash
tests' own entry). Then, measured in the same run:
- resume: the same spec again: it restores step 2 and trains steps 3-4 (2 steps) and exports;
- peer, fresh: a new output folder with max_steps 2: starts from nothing, trains 2 steps and exports.
Both pay process start-up, model load, store open, the epoch plan over all N pairs and the export; the difference
is what resuming costs (finding and loading the checkpoint, placing the sampler at step 2).

    python benchmarks/rm_resume.py                      # 1,000,000 pairs
    python benchmarks/rm_resume.py --pairs 20000        # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _torchrun(spec: Path, entry: str, kill_at: int = 0) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "SYNPREF_TEST_KILL_AT": str(kill_at),
           "TQDM_DISABLE": "1"}
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", entry, str(spec)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    return time.perf_counter() - t, done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=1_000_000)
    ap.add_argument("--workdir", default="", help="keep the store here (reused by key) instead of a temp folder")
    a = ap.parse_args()
    import polars as pl

    from benchmarks.rm_gpu import synthetic_rows
    from pipelines.rm.launch import write_spec
    from pipelines.rm.store import PairSource, SourceTable, build_token_store
    from pipelines.rm.tiny import build_tiny_decoder
    from pipelines.rm.train import TrainConfig

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        backbone = build_tiny_decoder(work / "qwen3", "qwen3")
        pairs = work / f"pairs-{a.pairs}.parquet"
        if not pairs.exists():
            pl.DataFrame(synthetic_rows(a.pairs, history_words=40, response_words=20)).write_parquet(pairs)
        t = time.perf_counter()
        store = build_token_store(PairSource([SourceTable(str(pairs))]), backbone, work / "stores", max_len=512,
                                  parallel="inprocess").store
        build_s = time.perf_counter() - t
        cfg = TrainConfig(lr=1e-3, batch_size=64, max_steps=4, max_len=512, eval_every=10**9, save_last_every=2,
                          progress=False, layout="shared_prefix")
        killed = write_spec(backbone, store, [], cfg, str(work / "killed" / "out"))
        dead_s, dead = _torchrun(killed, "tests.kill_launch", kill_at=3)
        latest = json.loads((work / "killed" / "out" / "checkpoints" / "latest").read_text())["step"]
        assert dead.returncode != 0 and latest == 2, (dead.returncode, latest, dead.stderr[-2000:])
        resume_s, again = _torchrun(killed, "pipelines.rm.launch")
        assert again.returncode == 0, again.stderr[-3000:]
        res = json.loads((killed.parent / "result.json").read_text())
        assert res["resumed_from_step"] == 2 and res["steps"] == 4, res
        fresh_cfg = TrainConfig(**{**asdict(cfg), "max_steps": 2})
        fresh = write_spec(backbone, store, [], fresh_cfg, str(work / "fresh" / "out"))
        fresh_s, ok = _torchrun(fresh, "pipelines.rm.launch")
        assert ok.returncode == 0, ok.stderr[-3000:]
        counts = store.manifest.get("counts", {})
        out = {"pairs": len(store), "input_rows": a.pairs, "counts": counts, "store_build_s": round(build_s, 1),
               "killed_run_s": round(dead_s, 1),
               "resume_2_steps_s": round(resume_s, 1), "fresh_2_steps_s": round(fresh_s, 1),
               "resume_overhead_s": round(resume_s - fresh_s, 1)}
        print(f"{len(store):,} pairs (store built in {build_s:.1f} s): resume after kill -9 (restore step 2, train "
              f"2 steps, export) {resume_s:.1f} s vs a fresh start (2 steps, export) {fresh_s:.1f} s: resume costs "
              f"{resume_s - fresh_s:+.1f} s ({resume_s / fresh_s:.2f}x)")
        print(json.dumps(out))


if __name__ == "__main__":
    main()

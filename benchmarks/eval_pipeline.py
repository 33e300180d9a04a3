"""Evaluation on Ray with several RMs: every model's actor pool working at once (the texts cut into blocks of
`batch_rows`, RayEngine.score_texts) vs one model at a time through the same engine (the named peer: what a loop
over models does). Items/s and the machine's CPU utilization while scoring (psutil, sampled every 0.2 s).

    python benchmarks/eval_pipeline.py --models 4 --texts 4000 --cpus 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--texts", type=int, default=4000)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--batch-rows", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=128)
    a = ap.parse_args()
    import polars as pl
    import psutil
    import ray

    from pipelines.compute import RayEngine
    from pipelines.rm.registry import ModelRef
    from pipelines.rm.tiny import build_tiny_decoder
    from tests.rm_helpers import synth_rows

    tmp = Path(tempfile.mkdtemp(prefix="eval-pipe-"))
    models = {f"m{i}": (ModelRef(f"m{i}", build_tiny_decoder(tmp / f"m{i}", "qwen3", seed=i, hidden=128, layers=2),
                                 "", ""), a.max_len) for i in range(a.models)}
    rows = synth_rows(a.texts, seed=3)
    texts = pl.DataFrame({"text_key": [f"t{i}" for i in range(len(rows))], "history": [r["history"] for r in rows],
                          "response": [r["chosen"] for r in rows]})
    ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False)
    engine = RayEngine(actors=1, batch_rows=a.batch_rows, max_len=a.max_len)

    def measured(fn):
        samples, stop = [], threading.Event()
        psutil.cpu_percent(None)

        def watch():
            while not stop.wait(0.2):
                samples.append(psutil.cpu_percent(None))

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        stop.set()
        t.join()
        return out, dt, sum(samples) / max(len(samples), 1)

    engine.score_texts(texts.head(64), models)  # warm-up: Ray Data's first pipeline start
    together, t_all, cpu_all = measured(lambda: engine.score_texts(texts, models))
    alone, t_one, cpu_one = measured(lambda: {n: engine.score_texts(texts, {n: m})[n] for n, m in models.items()})
    for n in models:  # the same rewards either way
        a_, b_ = together[n].sort("text_key"), alone[n].sort("text_key")
        assert (a_["reward"] - b_["reward"]).abs().max() < 1e-4
    items = texts.height * a.models
    print(f"{a.models} models x {texts.height} texts on {a.cpus} CPUs, blocks of {a.batch_rows}:")
    print(f"  all pools at once (ours)    {items / t_all:8.0f} items/s  CPU {cpu_all:5.1f}%  ({t_all:.1f} s)")
    print(f"  one model at a time (peer)  {items / t_one:8.0f} items/s  CPU {cpu_one:5.1f}%  ({t_one:.1f} s)")
    print(f"ratio ours / peer: {t_one / t_all:.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()

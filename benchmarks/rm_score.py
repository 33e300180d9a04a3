"""Scoring throughput: SynPref's batch scorer vs a plain `transformers` text-classification pipeline.

Same model, same pairs, same max length and batch size, same machine, one run. SynPref sorts by length and
scores chosen+rejected of a batch in one forward pass under inference_mode; the peer feeds the pipeline every
(conversation, response) as a text pair with function_to_apply="none". Both must agree on the rewards.

    python benchmarks/rm_score.py --pairs 1000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    import numpy as np
    import torch
    from transformers import pipeline

    from benchmarks.rm_train import load_rows
    from pipelines.rm.data import Renderer
    from pipelines.rm.model import load_reward_model
    from pipelines.rm.score import score_rows
    from pipelines.schema import prompt_text
    from pipelines.settings import minilm_path

    rows, _, src = load_rows(10**6, 1)
    rm = load_reward_model(minilm_path(), seed=0)
    # only pairs that fit without truncation: both sides then see exactly the same tokens
    r = Renderer(rm, a.max_len)
    rows = [x for x in rows if max(len(r.render(x["history"], x["chosen"])[0]),
                                   len(r.render(x["history"], x["rejected"])[0])) <= a.max_len][:a.pairs]
    rm.model.eval()
    score_rows(rm, rows[:32], "warmup", max_len=a.max_len, batch_size=a.batch)
    t = time.perf_counter()
    ours, _ = score_rows(rm, rows, "bench", max_len=a.max_len, batch_size=a.batch)
    t_ours = time.perf_counter() - t

    pipe = pipeline("text-classification", model=rm.model, tokenizer=rm.tokenizer, device=-1,
                    function_to_apply="none", top_k=None)
    tok_kw = {"truncation": "only_first", "max_length": a.max_len}
    inputs = [{"text": prompt_text(r["history"]), "text_pair": resp} for r in rows for resp in (r["chosen"], r["rejected"])]
    pipe(inputs[:32], batch_size=a.batch, **tok_kw)
    t = time.perf_counter()
    with torch.inference_mode():
        out = pipe(inputs, batch_size=a.batch, **tok_kw)
    t_pipe = time.perf_counter() - t
    peer = np.array([o[0]["score"] if isinstance(o, list) else o["score"] for o in out]).reshape(-1, 2)
    mine = ours.sort(by=ours["pair_id"].replace_strict({r["pair_id"]: i for i, r in enumerate(rows)}, default=None))
    agree = float(np.mean(np.abs(peer[:, 0] - mine["r_chosen"].to_numpy()) < 1e-3))
    n = len(rows)
    print(f"data: {src}; {n} pairs, max_len {a.max_len}, batch {a.batch}, torch threads {torch.get_num_threads()}")
    print(f"synpref scorer: {n / t_ours:,.1f} pairs/s | transformers pipeline: {n / t_pipe:,.1f} pairs/s | "
          f"ratio {t_pipe / t_ours:.2f}x | rewards agree (|Δ|<1e-3) on {100 * agree:.1f}% of pairs")


if __name__ == "__main__":
    main()

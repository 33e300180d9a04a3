"""Curation quality on real pairs with injected label noise: does Stage 2 find the flips, and does it pay off?

On the hh-rlhf pairs in ../shared (a fraction `--flip` of the pool labels swapped, truth kept aside):
  human seed (clean)  -> gold RM (MiniLM)
  silver (judged pool sample, simulated LLM judges with accuracy --judge-acc) -> "best Stage-1" RM
  Stage 2 over the rest of the pool: confident pairs skip judging, the others are judged; keep rule.
Reports flip-detection precision/recall, kept-set label precision, and held-out accuracy of RMs trained on the
raw (noisy) pool, the curated pool and the clean pool, all in one run.

    python benchmarks/curation.py --flip 0.3
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flip", type=float, default=0.3)
    ap.add_argument("--seed-size", type=int, default=400)
    ap.add_argument("--silver-size", type=int, default=500)
    ap.add_argument("--test", type=int, default=400)
    ap.add_argument("--judge-acc", type=float, default=0.85)
    ap.add_argument("--margin", type=float, default=0.1)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--epochs", type=float, default=2.0)
    a = ap.parse_args()
    import polars as pl

    from benchmarks.rm_train import HH, load_rows
    from pipelines.annotate.backends import SimulatedBackend
    from pipelines.annotate.prompts import load_prompt
    from pipelines.annotate.runner import aggregate_judgments, judge_pairs
    from pipelines.curate.stage2 import keep_rule
    from pipelines.lake import Lake
    from pipelines.rm.model import load_reward_model
    from pipelines.rm.score import score_rows
    from pipelines.rm.train import TrainConfig, train_reward_model
    from pipelines.settings import minilm_path

    if not HH.exists():
        raise SystemExit(f"needs the real pairs at {HH}")
    rows, _, src = load_rows(10**6, 1)
    rng = random.Random(0)
    rng.shuffle(rows)
    test, seed, rest = rows[:a.test], rows[a.test:a.test + a.seed_size], rows[a.test + a.seed_size:]
    flipped = {}
    noisy = []
    for r in rest:
        f = rng.random() < a.flip
        flipped[r["pair_id"]] = f
        noisy.append({**r, "chosen": r["rejected"], "rejected": r["chosen"]} if f else r)
    silver_src, pool = noisy[:a.silver_size], noisy[a.silver_size:]
    cfg = TrainConfig(lr=5e-5, batch_size=16, epochs=a.epochs, max_len=a.max_len, eval_every=10**9, progress=False)

    def train(rows_, name):
        res = train_reward_model(load_reward_model(minilm_path(), seed=0), rows_, [], cfg, tempfile.mkdtemp(prefix=name))
        return res.best_dir

    def acc(path):
        s, _ = score_rows(load_reward_model(path), test, "t", max_len=a.max_len)
        return float((s["margin"] > 0).mean())

    judges = [SimulatedBackend(name="judge-a", accuracy=a.judge_acc), SimulatedBackend(name="judge-b", accuracy=a.judge_acc - 0.05)]
    lake = Lake(tempfile.mkdtemp())
    truth_ok = lambda r: not flipped[r["pair_id"]]  # noqa: E731  (stored label right?)

    # silver: the judged sample, oriented by the ensemble
    sdf = pl.DataFrame(silver_src)
    judge_pairs(lake, sdf, judges, load_prompt("judge_v1"), "bench", samples=3, truth_of=truth_ok, context="silver")
    agg = {r["pair_id"]: r["final"] for r in aggregate_judgments(lake.read("llm_judgments")).iter_rows(named=True)}
    silver = [r if agg.get(r["pair_id"]) == "chosen" else {**r, "chosen": r["rejected"], "rejected": r["chosen"]}
              for r in silver_src if agg.get(r["pair_id"]) in ("chosen", "rejected")]
    gold_dir, best_dir = train(seed, "gold"), train(silver, "best")
    best_s, _ = score_rows(load_reward_model(best_dir), pool, "best", max_len=a.max_len)
    gold_s, _ = score_rows(load_reward_model(gold_dir), pool, "gold", max_len=a.max_len)
    unconf = set(best_s.filter(pl.col("p") <= 0.5 + a.margin)["pair_id"])
    pdf = pl.DataFrame(pool)
    judge_pairs(lake, pdf.filter(pl.col("pair_id").is_in(list(unconf))), judges, load_prompt("judge_v1"), "bench",
                samples=3, truth_of=truth_ok, context="stage2")
    j = lake.read("llm_judgments").filter(pl.col("context") == "stage2")
    curated, recycled = keep_rule(pdf, best_s, gold_s, aggregate_judgments(j), margin=a.margin, best_version="best",
                                  gold_version="gold", judge_version="j")
    kept_ok = sum(not flipped[p] for p in curated["pair_id"])
    caught = sum(flipped[p] for p in recycled["pair_id"])
    n_flip = sum(flipped[r["pair_id"]] for r in pool)
    clean_pool = [({**r, "chosen": r["rejected"], "rejected": r["chosen"]} if flipped[r["pair_id"]] else r) for r in pool]
    acc_gold, acc_best = acc(gold_dir), acc(best_dir)
    acc_raw, acc_cur, acc_clean = acc(train(pool, "raw")), acc(train(curated.to_dicts(), "cur")), acc(train(clean_pool, "clean"))
    print(f"data: {src}; pool {len(pool)} pairs with {n_flip} flipped ({100 * a.flip:.0f}% target); seed {len(seed)}, "
          f"silver {len(silver)}, test {len(test)}; judges simulated acc {a.judge_acc}/{a.judge_acc - 0.05}")
    print(f"gold RM test acc {acc_gold:.3f}; best (silver) RM test acc {acc_best:.3f}; judged {len(unconf)} unconfident pairs")
    print(f"kept {curated.height}, recycled {recycled.height}: kept-set label precision {kept_ok / max(curated.height, 1):.3f} "
          f"(pool {1 - n_flip / len(pool):.3f}); flip detection precision {caught / max(recycled.height, 1):.3f}, "
          f"recall {caught / max(n_flip, 1):.3f}")
    print(f"held-out accuracy of MiniLM RMs: raw {acc_raw:.3f} | curated {acc_cur:.3f} | clean {acc_clean:.3f} "
          f"(curated - clean = {100 * (acc_cur - acc_clean):+.1f} pt)")


if __name__ == "__main__":
    main()

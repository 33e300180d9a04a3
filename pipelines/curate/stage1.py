"""Stage 1 (paper §3.2), the pure parts: error-driven adaptive retrieval and folding judged pairs into silver.

One iteration, as the asset runs it:
 1. train a BT RM on D_silver, pick the checkpoint by accuracy on D_gold;
 2. p = σ(r(y_w) − r(y_l)) on every gold pair;
 3. retrieve k(p) nearest unverified pairs per gold pair (k = 8 if p <= 0.5, else ceil(8·(1 − p)));
 4. judge them with the LLM ensemble, the nearest gold pairs as exemplars;
 5. decisive LLM labels join D_silver (oriented by the verdict), human ones stay in D_gold.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from pipelines.curate.retrieve import VectorIndex, adaptive_k

SILVER = "silver_pairs"
SILVER_SCHEMA = {"pair_id": pl.String, "history": pl.List(pl.Struct({"role": pl.String, "content": pl.String})),
                 "chosen": pl.String, "rejected": pl.String, "label_flipped": pl.Boolean, "iteration": pl.Int64,
                 "agree_frac": pl.Float64, "task_category": pl.String, "label_origin": pl.String,
                 "judge_prompt_version": pl.String}


def retrieve_for_gold(gold_p: pl.DataFrame, gold_vecs: np.ndarray, pool_index: VectorIndex,
                      k_max: int = 8) -> pl.DataFrame:
    """gold_p: pair_id, p (rows aligned with gold_vecs). Returns query_pair_id, pair_id, rank, similarity, k, p."""
    rows = []
    ks = [adaptive_k(float(p), k_max) for p in gold_p["p"].to_list()]
    if not ks or len(pool_index) == 0:
        return pl.DataFrame(schema={"query_pair_id": pl.String, "pair_id": pl.String, "rank": pl.Int64,
                                    "similarity": pl.Float64, "k": pl.Int64, "p": pl.Float64})
    scores, ids = pool_index.search(gold_vecs, max(ks))
    for q, (qid, p, k) in enumerate(zip(gold_p["pair_id"].to_list(), gold_p["p"].to_list(), ks)):
        for rank, (pid, s) in enumerate(zip(ids[q][:k], scores[q][:k])):
            rows.append({"query_pair_id": qid, "pair_id": pid, "rank": rank, "similarity": float(s), "k": k,
                         "p": float(p)})
    return pl.DataFrame(rows, schema={"query_pair_id": pl.String, "pair_id": pl.String, "rank": pl.Int64,
                                      "similarity": pl.Float64, "k": pl.Int64, "p": pl.Float64})


def exemplars_for(pairs: pl.DataFrame, pair_vecs: np.ndarray, gold: pl.DataFrame, gold_index: VectorIndex,
                  n: int = 8) -> dict[str, list[dict]]:
    """The n nearest human-verified pairs (with attributes and human label) for each pair to be judged."""
    if len(gold_index) == 0 or pairs.height == 0:
        return {}
    by_id = {r["pair_id"]: r for r in gold.iter_rows(named=True)}
    _, ids = gold_index.search(pair_vecs, n)
    return {pid: [by_id[g] for g in ids[i] if g in by_id and g != pid]
            for i, pid in enumerate(pairs["pair_id"].to_list())}


def judged_to_silver(pairs: pl.DataFrame, verdicts: pl.DataFrame, iteration: int, prompt_version: str,
                     min_agree: float = 0.5, label_origin: str = "llm") -> pl.DataFrame:
    """Decisive ensemble verdicts become silver pairs; `rejected` verdicts flip the stored orientation.
    pairs: pair_id, history, chosen, rejected, task_category. verdicts: aggregate_judgments output."""
    v = verdicts.filter(pl.col("final") != "undecidable")
    v = v.filter(pl.when(pl.col("final") == "chosen").then(pl.col("agree_frac") >= min_agree)
                 .otherwise((1 - pl.col("agree_frac")) >= min_agree))
    df = pairs.join(v.select("pair_id", "final", "agree_frac"), on="pair_id", how="inner")
    flip = pl.col("final") == "rejected"
    return df.select(
        "pair_id", "history",
        chosen=pl.when(flip).then(pl.col("rejected")).otherwise(pl.col("chosen")),
        rejected=pl.when(flip).then(pl.col("chosen")).otherwise(pl.col("rejected")),
        label_flipped=flip, iteration=pl.lit(iteration, pl.Int64), agree_frac="agree_frac",
        task_category=pl.col("task_category").cast(pl.String), label_origin=pl.lit(label_origin),
        judge_prompt_version=pl.lit(prompt_version),
    ).cast(SILVER_SCHEMA)

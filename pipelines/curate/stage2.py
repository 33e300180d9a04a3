"""Stage 2 (paper §3.3): the consistency filter over the in-the-wild pool, and flip-recycling.

A pair keeps its ORIGINAL label iff the gold RM agrees AND (the LLM judges agree OR the best Stage-1 RM agrees).
Confident pairs (best-RM p > 0.5 + margin) skip LLM judging. Discarded pairs are recycled with chosen/rejected
swapped (the paper's 40M mixture; never verified, kept in a separate table).
"""

from __future__ import annotations

import polars as pl

CURATED = "curated_pairs"
RECYCLED = "recycled_pairs"


def split_confident(scores: pl.DataFrame, margin: float) -> tuple[pl.DataFrame, pl.DataFrame]:
    conf = pl.col("p") > 0.5 + margin
    return scores.filter(conf), scores.filter(~conf)


def keep_rule(pool: pl.DataFrame, best: pl.DataFrame, gold: pl.DataFrame, llm: pl.DataFrame, *, margin: float,
              best_version: str, gold_version: str, judge_version: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """pool: pair_id, history, chosen, rejected (+ task_category). best/gold: rm_scores (pair_id, p).
    llm: aggregate_judgments (pair_id, final, agree_frac) for the unconfident pairs.
    Returns (curated, recycled) with the reason and the versions that decided each row."""
    df = (pool.join(best.select("pair_id", p_best="p"), on="pair_id", how="inner")
          .join(gold.select("pair_id", p_gold="p"), on="pair_id", how="inner")
          .join(llm.select("pair_id", llm_final="final", llm_agree="agree_frac"), on="pair_id", how="left"))
    confident = pl.col("p_best") > 0.5 + margin
    gold_ok = pl.col("p_gold") > 0.5
    rm_ok = pl.col("p_best") > 0.5
    llm_ok = pl.col("llm_final") == "chosen"
    df = df.with_columns(confident=confident, gold_agrees=gold_ok, rm_agrees=rm_ok,
                         llm_agrees=llm_ok.fill_null(False), judged=pl.col("llm_final").is_not_null())
    keep = pl.col("gold_agrees") & (pl.col("llm_agrees") | pl.col("rm_agrees"))
    why = pl.concat_str([
        pl.when(pl.col("confident")).then(pl.lit("confident")).otherwise(pl.lit("unconfident")),
        pl.when(pl.col("gold_agrees")).then(pl.lit("gold=agree")).otherwise(pl.lit("gold=disagree")),
        pl.when(pl.col("rm_agrees")).then(pl.lit("rm=agree")).otherwise(pl.lit("rm=disagree")),
        pl.when(~pl.col("judged")).then(pl.lit("llm=not-asked")).when(pl.col("llm_agrees")).then(pl.lit("llm=agree"))
        .otherwise(pl.lit("llm=") + pl.col("llm_final").fill_null("none")),
    ], separator=" ")
    df = df.with_columns(why=why, best_rm_version=pl.lit(best_version), gold_rm_version=pl.lit(gold_version),
                         judge_version=pl.when(pl.col("judged")).then(pl.lit(judge_version)).otherwise(None))
    cols = ["pair_id", "history", "chosen", "rejected", "p_best", "p_gold", "llm_final", "llm_agree", "why",
            "best_rm_version", "gold_rm_version", "judge_version"]
    if "task_category" in df.columns:
        cols.insert(4, "task_category")
    curated = df.filter(keep).select(cols)
    recycled = (df.filter(~keep).select(cols)
                .with_columns(chosen=pl.col("rejected"), rejected=pl.col("chosen"), why="flipped: " + pl.col("why")))
    return curated, recycled

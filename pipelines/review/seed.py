"""The human-verified seed: resolved, non-discarded human labels joined back to their pairs, oriented so that
`chosen` is what humans preferred, split into a gold validation slice and the rest (D_gold of the paper)."""

from __future__ import annotations

import hashlib

import polars as pl

from pipelines.annotate.runner import latest_attributes
from pipelines.review.ledger import resolve

SEED = "human_verified_seed"


def gold_split(pair_id: str, gold_frac: float) -> str:
    h = int(hashlib.sha256(f"gold|{pair_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "gold" if h < gold_frac else "train"


def build_seed(verdicts: pl.DataFrame, pairs: pl.DataFrame, annotations: pl.DataFrame | None,
               gold_frac: float = 0.3) -> pl.DataFrame:
    """pairs: raw_pairs rows. Humans may flip a pair: `chosen` here is always the human-preferred response, and
    `label_flipped` says whether that differs from the source's label."""
    res = resolve(verdicts).filter(pl.col("resolved") != "discard")
    df = res.join(pairs.select("pair_id", "history", "chosen", "rejected", "source"), on="pair_id", how="inner")
    flip = pl.col("resolved") == "rejected"
    df = df.with_columns(
        chosen=pl.when(flip).then(pl.col("rejected")).otherwise(pl.col("chosen")),
        rejected=pl.when(flip).then(pl.col("chosen")).otherwise(pl.col("rejected")),
        label_flipped=flip,
        label_origin=pl.when(pl.col("origin") == "simulated").then(pl.lit("simulated")).otherwise(pl.lit("human")),
        split=pl.col("pair_id").map_elements(lambda p: gold_split(p, gold_frac), return_dtype=pl.String),
    )
    if annotations is not None and annotations.height:
        df = df.join(latest_attributes(annotations), on="pair_id", how="left")
    else:
        df = df.with_columns(task_category=pl.lit(None, pl.String), objectivity=pl.lit(None, pl.String),
                             controversiality=pl.lit(None, pl.String),
                             desired_attributes=pl.lit(None, pl.List(pl.String)), guideline=pl.lit(None, pl.String))
    return df.select("pair_id", "history", "chosen", "rejected", "source", "label_origin", "label_flipped", "split",
                     "how", "n_verdicts", "agreement", "task_category", "objectivity", "controversiality",
                     "desired_attributes", "guideline").sort("pair_id")

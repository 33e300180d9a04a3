"""Choosing pairs for humans (paper §1.3): objective, low-controversy pairs first; diversity across task
categories through per-category quotas; once an RM exists, uncertain or RM-misjudged pairs are preferred."""

from __future__ import annotations

import random

import polars as pl

from pipelines.schema import HISTORY_DTYPE
from pipelines.tables import QUEUE  # noqa: F401  (re-exported)

# The queued pair's text travels with it (the queue is review-sized), so the app never scans raw_pairs for an item;
# null when the candidates came without text (the app then reads the pair by id).
QUEUE_SCHEMA = {"pair_id": pl.String, "queue_version": pl.String, "priority": pl.Int64, "task_category": pl.String,
                "objectivity": pl.String, "controversiality": pl.String, "why": pl.String,
                "overlap": pl.Boolean, "history": HISTORY_DTYPE, "chosen": pl.String, "rejected": pl.String,
                "label_conflict": pl.Boolean}

_CONTRO = {"low": 0, "medium": 1, "high": 2}


def queue_candidates(pool: pl.LazyFrame, exclude: pl.LazyFrame, per_category: int, seed: int = 0) -> pl.DataFrame:
    """At most `per_category` candidates per task category, objective and low-controversy first (the order
    `build_queue` ranks by), picked lazily so the Stage-1 pool is never materialized whole. pool: pair_id,
    task_category, objectivity, controversiality."""
    tier = ((pl.col("objectivity") != "objective").cast(pl.Int64) * 3
            + pl.col("controversiality").replace_strict(_CONTRO, default=1, return_dtype=pl.Int64))
    order = tier.cast(pl.Float64) * 2.0 ** 40 + (pl.col("pair_id").hash(seed=seed) % (1 << 40)).cast(pl.Float64)
    return (pool.join(exclude, on="pair_id", how="anti").filter(pl.col("task_category").is_not_null())
            .with_columns(_rank=order.rank("ordinal").over("task_category"))
            .filter(pl.col("_rank") <= per_category).drop("_rank").collect())


def build_queue(annotated: pl.DataFrame, *, size: int, queue_version: str, quotas: dict[str, int] | None = None,
                rm_scores: pl.DataFrame | None = None, exclude: set[str] | None = None, overlap_frac: float = 0.1,
                seed: int = 0) -> pl.DataFrame:
    """annotated: pair_id, task_category, objectivity, controversiality. rm_scores (optional): pair_id, p.

    Returns `size` rows ordered by priority. Without explicit quotas every category gets an equal share
    (round-robin), so no category dominates the seed. `overlap` marks items meant for 2+ annotators
    (agreement measurement)."""
    df = annotated.filter(~pl.col("pair_id").is_in(list(exclude or ())))
    if rm_scores is not None and rm_scores.height:
        df = df.join(rm_scores.select("pair_id", "p"), on="pair_id", how="left")
        # 1 at p=0.5, 0 at p in {0,1}; pairs the RM has not scored count as half-uncertain
        uncertainty = (1 - (pl.col("p") - 0.5).abs() * 2).fill_null(0.5)
        wrong = (pl.col("p").fill_null(1.0) <= 0.5)
    else:
        uncertainty, wrong = pl.lit(0.0), pl.lit(False)
    rng = random.Random(seed)
    df = df.with_columns(
        _obj=(pl.col("objectivity") != "objective").cast(pl.Int64),
        _con=pl.col("controversiality").replace_strict(_CONTRO, default=1, return_dtype=pl.Int64),
        _unc=uncertainty, _wrong=wrong,
        _tie=pl.Series([rng.random() for _ in range(df.height)]),
    ).sort(["_obj", "_con", "_wrong", "_unc", "_tie"], descending=[False, False, True, True, False]).with_row_index("_rank")
    cats = sorted(df["task_category"].unique().drop_nulls().to_list())
    if quotas:
        per_cat = {c: quotas.get(c, 0) for c in cats}
    else:
        per_cat = {c: size for c in cats}  # round-robin below spreads them evenly
    groups = {c: df.filter(pl.col("task_category") == c).to_dicts() for c in cats}
    picked, taken = [], {c: 0 for c in cats}
    while len(picked) < size and any(taken[c] < min(per_cat[c], len(groups[c])) for c in cats):
        for c in cats:
            if len(picked) >= size:
                break
            if taken[c] < min(per_cat[c], len(groups[c])):
                picked.append(groups[c][taken[c]])
                taken[c] += 1
    picked.sort(key=lambda r: r["_rank"])  # quotas decide *what* is queued; the priority order decides *when*
    rows = []
    for i, r in enumerate(picked):
        why = ["objective" if r["_obj"] == 0 else "subjective", f"controversiality={r['controversiality']}"]
        if r.get("label_conflict"):
            why.append("label conflict: another source prefers the other response")
        if r["_wrong"]:
            why.append("RM misjudges it")
        elif rm_scores is not None and r["_unc"] > 0.6:
            why.append("RM uncertain")
        rows.append({"pair_id": r["pair_id"], "queue_version": queue_version, "priority": i,
                     "task_category": r["task_category"], "objectivity": r["objectivity"],
                     "controversiality": r["controversiality"], "why": ", ".join(why),
                     "overlap": rng.random() < overlap_frac, "history": r.get("history"),
                     "chosen": r.get("chosen"), "rejected": r.get("rejected"),
                     "label_conflict": bool(r.get("label_conflict"))})
    return pl.DataFrame(rows, schema=QUEUE_SCHEMA)

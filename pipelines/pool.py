"""Which pool a pair belongs to, bounded reads of it, and sending unusable pairs to quarantine.

The paper draws Stage 1 (human review, error-driven retrieval) from a small pool D_un (~1M pairs) and Stage 2 from
the rest, D_wild (tens of millions). A pair's pool is a stable hash of its id, so every asset and every rerun puts
it in the same pool without a lookup table.

Reads here are lazy (polars LazyFrames over Delta): a caller filters to a shard or a set of ids before collecting,
so nothing in this module holds a whole table. This module sits just above ingest (it reads what ingest wrote) and
below annotate: a pair's attributes are looked up in `pipelines.annotate.attributes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from pipelines.lake import Lake, now_utc
from pipelines.schema import QUARANTINE_SCHEMA, Reason
from pipelines.tables import QUARANTINE, RAW, SEED, SILVER, SYNTH_TRUTH

PAIR_COLUMNS = ["pair_id", "history", "chosen", "rejected"]


def pool_stage_expr(stage1_fraction: float) -> pl.Expr:
    """'stage1' | 'stage2' by a stable hash of pair_id (the first 32 bits of the XXH3-128 id)."""
    h = pl.col("pair_id").str.slice(0, 8).str.to_integer(base=16).cast(pl.Float64) / float(0xFFFFFFFF)
    return pl.when(h < stage1_fraction).then(pl.lit("stage1")).otherwise(pl.lit("stage2"))


def pool_pairs(lake: Lake, stage: str, stage1_fraction: float,
               columns: list[str] | None = None) -> pl.LazyFrame:
    """Raw pairs of one pool, lazily (filter further before collecting)."""
    cols = columns or [*PAIR_COLUMNS, "source", "shard", "source_row", "category_hint"]
    return lake.scan(RAW).filter(pool_stage_expr(stage1_fraction) == stage).select(cols)


def verified_ids(lake: Lake) -> pl.LazyFrame:
    """pair ids a later stage must leave alone: every human-verified pair and every silver pair."""
    parts = [lake.scan(t).select("pair_id") for t in (SEED, SILVER) if lake.exists(t)]
    return pl.concat(parts).unique() if parts else pl.LazyFrame(schema={"pair_id": pl.String})


def truth_of(lake: Lake, ids: pl.DataFrame | pl.Series) -> dict[str, bool]:
    """pair_id -> the stored label is right, for the given ids of project-made pairs (empty for real data).
    Bounded by `ids`: callers ask per chunk, never for the whole pool."""
    if not lake.exists(SYNTH_TRUTH):
        return {}
    want = (ids.select("pair_id") if isinstance(ids, pl.DataFrame) else ids.rename("pair_id").to_frame()).lazy()
    t = lake.scan(SYNTH_TRUTH).join(want, on="pair_id", how="semi").select("pair_id", "label_correct").collect()
    return dict(zip(t["pair_id"].to_list(), t["label_correct"].to_list()))


def truth_categories(lake: Lake, ids: pl.DataFrame) -> dict[str, str]:
    """pair_id -> the generator's task category (project-made data; feeds the simulated annotator only)."""
    if not lake.exists(SYNTH_TRUTH):
        return {}
    t = lake.scan(SYNTH_TRUTH).join(ids.select("pair_id").lazy(), on="pair_id", how="semi").collect()
    return dict(zip(t["pair_id"].to_list(), t["category"].to_list()))


def quarantine_pairs(lake: Lake, refused: pl.DataFrame, *, stage: str, reason: Reason | str, run_id: str) -> int:
    """Send already-ingested pairs a later stage cannot use to `quarantine`, keyed like ingest's rows, with their
    provenance (source, shard, row). refused: pair_id, detail, payload, and source/shard/source_row when the caller
    has them (Stage 2 does: it read them with the pair), else they are looked up. Idempotent. Returns how many."""
    reason = Reason(reason).value  # a known reason code, or a clear error
    if refused.height == 0:
        return 0
    if {"source", "shard", "source_row"} <= set(refused.columns):
        q = refused
    else:
        where = (lake.scan(RAW).select("pair_id", "source", "shard", "source_row")
                 .join(refused.select("pair_id").lazy(), on="pair_id", how="semi").collect())
        q = refused.join(where, on="pair_id")
    lake.merge_insert(QUARANTINE, q.select(
        "source", "shard", "source_row", stage=pl.lit(stage), reason=pl.lit(reason),
        detail=pl.col("detail").cast(pl.String).fill_null(""), payload=pl.col("payload").cast(pl.String).fill_null(""),
        pair_id="pair_id", run_id=pl.lit(run_id), quarantined_at=pl.lit(now_utc(), dtype=pl.Datetime("us", "UTC"))
    ).to_arrow(), keys=["shard", "source_row", "stage", "reason", "pair_id"], schema=QUARANTINE_SCHEMA)
    return refused.height


# --- work units: bounded slices of the raw table ------------------------------------------------------------------
@dataclass(frozen=True)
class WorkUnit:
    shard: str
    lo: int  # first source_row (inclusive)
    hi: int  # last source_row (exclusive)

    @property
    def name(self) -> str:
        return f"{self.shard}#{self.lo}"


def work_units(lake: Lake, unit_rows: int) -> list[WorkUnit]:
    """Every unit of the raw table: each shard cut into source-row ranges of `unit_rows`. Enumerated from a
    two-column aggregate (one row per shard), so it costs a column scan, not the table."""
    if not lake.exists(RAW):
        return []
    per = (lake.scan(RAW).group_by("shard").agg(lo=pl.col("source_row").min(), hi=pl.col("source_row").max() + 1)
           .sort("shard").collect())
    units = []
    for shard, lo, hi in per.iter_rows():
        start = (lo // unit_rows) * unit_rows
        units += [WorkUnit(shard, a, a + unit_rows) for a in range(start, hi, unit_rows)]
    return units


def read_unit(lake: Lake, unit: WorkUnit, stage: str, stage1_fraction: float,
              exclude_verified: bool = True) -> pl.DataFrame:
    """The unit's pairs of one pool: one shard's row range (Delta skips the other files by their statistics),
    minus anything verified (seed, silver) unless `exclude_verified` is off."""
    lf = (lake.scan(RAW).filter((pl.col("shard") == unit.shard) & (pl.col("source_row") >= unit.lo)
                                & (pl.col("source_row") < unit.hi))
          .filter(pool_stage_expr(stage1_fraction) == stage)
          .select(*PAIR_COLUMNS, "source", "shard", "source_row", "category_hint", "margin"))
    if exclude_verified:
        lf = lf.join(verified_ids(lake), on="pair_id", how="anti")
    return lf.collect()

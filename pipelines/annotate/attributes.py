"""A pair's latest LLM attributes, read back from the annotation cache: what curate, review and the CLI join onto
pairs. Here in annotate, next to the cache that writes them, so that pipelines.pool needs no annotate import."""

from __future__ import annotations

import polars as pl

from pipelines.annotate.cache import cache_scan, parts_of
from pipelines.lake import Lake, latest_by_key
from pipelines.tables import ANNOTATIONS

ATTRIBUTE_COLUMNS = ["task_category", "objectivity", "controversiality", "desired_attributes", "guideline"]


def latest_attributes(annotations: pl.DataFrame) -> pl.DataFrame:
    """One row per pair: its most recent successful attributes (pair_id + ATTRIBUTE_COLUMNS)."""
    return latest_by_key(annotations.filter(pl.col("status") == "ok"), "pair_id").select("pair_id", *ATTRIBUTE_COLUMNS)


# a polars frame schema (pair_id + ATTRIBUTE_COLUMNS); taxonomy.ATTRIBUTES_SCHEMA is the LLM's JSON schema
ATTRIBUTES_SCHEMA = {"pair_id": pl.String, "task_category": pl.String, "objectivity": pl.String,
                     "controversiality": pl.String, "desired_attributes": pl.List(pl.String), "guideline": pl.String}


def attributes(lake: Lake, ids: pl.DataFrame | pl.LazyFrame | None = None, table: str = ANNOTATIONS) -> pl.LazyFrame:
    """pair_id + the latest successful attributes, lazily; of `ids` only when given (the semi-join comes before
    the latest-row sort, so a bounded caller never sorts the whole table)."""
    if not lake.exists(table):
        return pl.LazyFrame(schema=ATTRIBUTES_SCHEMA)
    parts = parts_of(ids) if isinstance(ids, pl.DataFrame) else None  # a unit's frame reads its cache blocks only
    ok = cache_scan(lake, table, parts).filter(pl.col("status") == "ok")
    if ids is not None:
        ok = ok.join(ids.select("pair_id").lazy(), on="pair_id", how="semi")
    return latest_by_key(ok, ["pair_id"]).select("pair_id", *ATTRIBUTE_COLUMNS)


def with_attributes(pairs: pl.LazyFrame, lake: Lake) -> pl.LazyFrame:
    """Pairs joined with their latest attributes; pairs without attributes are dropped."""
    return pairs.join(attributes(lake, pairs.select("pair_id")), on="pair_id", how="inner")

"""Where the LLM caches keep their rows, so that a work unit's lookups read only its own files.

Attributes, judgments and pre-checks are append-only caches keyed by a hash `pair_id`, looked up before each unit
is sent to the LLMs. Unpartitioned, every lookup reads every file's pair ids: at 40M pairs, 30% unconfident, two
judges x three samples, ~70M rows in ~270k files re-read for each of ~800 units. So rows carry `cache_part`, the
block of raw source rows the pair came from (`<sha1(shard)[:12]>-<source_row // CACHE_BLOCK_ROWS>`), and the table
is partitioned by it. A pair's block is fixed by its provenance, not by `unit_rows`, so units cut another way still
find their rows. A lookup reads the blocks of its pairs plus `_`, where rows of pairs without provenance go (seed-
and review-scale contexts), and nothing else; each call compacts the blocks it wrote (delta-rs `optimize`), so a
block stays a few files however many chunks were appended. Old files are left for `vacuum` (time travel keeps
working until then).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import polars as pl
import pyarrow as pa
from deltalake import write_deltalake

from pipelines.lake import Lake

CACHE_PART = "cache_part"
CACHE_BLOCK_ROWS = 10_000  # a default unit (50k rows) reads its 5 blocks; a smaller unit reads at most one 10k block
NO_PROVENANCE = "_"


@lru_cache(maxsize=4096)
def _shard_key(shard: str) -> str:
    return hashlib.sha1(shard.encode()).hexdigest()[:12]


def part_of(row: dict) -> str:
    """The cache block of one pair row (needs `shard` and `source_row`; `_` without them)."""
    shard, source_row = row.get("shard"), row.get("source_row")
    if shard is None or source_row is None:
        return NO_PROVENANCE
    return f"{_shard_key(shard)}-{int(source_row) // CACHE_BLOCK_ROWS}"


def parts_of(pairs: pl.DataFrame) -> list[str] | None:
    """The blocks a lookup of `pairs` must read, or None (every block) when the pairs carry no provenance. Bounded
    by the caller's frame (a unit or a chunk): one row per (shard, block)."""
    if not {"shard", "source_row"} <= set(pairs.columns):
        return None
    blocks = (pairs.select("shard", block=pl.col("source_row") // CACHE_BLOCK_ROWS).unique()
              .filter(pl.col("shard").is_not_null() & pl.col("block").is_not_null()))
    return sorted({NO_PROVENANCE, *(f"{_shard_key(s)}-{b}" for s, b in blocks.iter_rows())})


def _partitioned(lake: Lake, table: str) -> bool:
    return CACHE_PART in lake.delta(table).metadata().partition_columns


def cache_scan(lake: Lake, table: str, parts: list[str] | None) -> pl.LazyFrame:
    """The cache rows of those blocks only (Delta partition pruning through the log), lazily; every row when
    `parts` is None or the table predates the layout. The frame has no `cache_part` column."""
    if parts is None or not _partitioned(lake, table):
        lf = lake.scan(table)
        return lf.drop(CACHE_PART) if CACHE_PART in lf.collect_schema() else lf
    dt = lake.delta(table)
    files = dt.file_uris(file_pruning_predicate=[(CACHE_PART, "in", parts)])
    full = pa.schema(dt.schema().to_arrow())  # arro3 -> pyarrow through the Arrow C interface
    schema = pa.schema([f for f in full if f.name != CACHE_PART])
    if not files:
        return pl.LazyFrame(pl.from_arrow(schema.empty_table()))
    return pl.scan_parquet(files, storage_options=lake.storage_options or None,
                           schema=pl.from_arrow(schema.empty_table()).schema)


def cache_append(lake: Lake, table: str, rows: pl.DataFrame, parts: list[str]) -> None:
    """Append one chunk's rows (with `cache_part`) to its blocks; a table written before this layout is rewritten
    once, streaming, with its rows in `_`."""
    if lake.exists(table) and not _partitioned(lake, table):
        _migrate(lake, table)
    lake.append(table, rows, partition_by=[CACHE_PART])
    parts.extend(p for p in rows[CACHE_PART].unique().to_list() if p not in parts)


def compact(lake: Lake, table: str, parts: list[str]) -> None:
    """Bin-pack the blocks a call appended to (one file per block at this scale)."""
    if parts and lake.exists(table):
        lake.delta(table).optimize.compact(partition_filters=[(CACHE_PART, "in", sorted(parts))])


def _migrate(lake: Lake, table: str) -> None:
    dt = lake.delta(table)
    src = dt.to_pyarrow_dataset()
    schema = src.schema.append(pa.field(CACHE_PART, pa.string()))

    def batches():
        for b in src.to_batches():
            yield pa.RecordBatch.from_arrays([*b.columns, pa.array([NO_PROVENANCE] * b.num_rows, pa.string())],
                                             schema=schema)

    write_deltalake(lake.uri(table), pa.RecordBatchReader.from_batches(schema, batches()), mode="overwrite",
                    schema_mode="overwrite", partition_by=[CACHE_PART], storage_options=lake.storage_options)


def with_parts(rows: pl.DataFrame, pairs: list[dict]) -> pl.DataFrame:
    """The chunk's rows with the cache block of the pair each row answers (row-aligned with `pairs`)."""
    return rows.with_columns(pl.Series(CACHE_PART, [part_of(r) for r in pairs], pl.String))


def done_keys(lake: Lake, table: str, model: str, prompt_version: str, pairs: pl.DataFrame,
              extra: list[str] | None = None, retry_failed: bool = True) -> set:
    """Keys already answered among `pairs` only (a semi-join, bounded by the caller's chunk): status ok, or any
    recorded outcome when `retry_failed` is off (a failure after every attempt is then final). Reads only the
    cache blocks of `pairs` (pipelines/annotate/cache.py)."""
    if not lake.exists(table) or pairs.height == 0:
        return set()
    cols = ["pair_id", *(extra or [])]
    status = pl.col("status") == "ok" if retry_failed else pl.col("status").is_in(["ok", "failed"])
    df = (cache_scan(lake, table, parts_of(pairs)).filter((pl.col("model") == model) & (pl.col("prompt_version") == prompt_version)
                                  & status)
          .join(pairs.select("pair_id").unique().lazy(), on="pair_id", how="semi").select(cols).collect())
    return set(df.iter_rows()) if extra else set(df["pair_id"].to_list())

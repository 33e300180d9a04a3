"""The lake: Delta tables under one root, a local folder or `s3://bucket/prefix`, through one code path.

Why not dagster-deltalake-polars' IO manager: it has no MERGE mode (dagster#32644) and can overwrite a whole
table when a non-datetime partition predicate fails (dagster#34064). Ingest must be an idempotent MERGE on
`pair_id` and the ledger an append, so the assets write through this class and record lineage themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, TypeVar

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError, TableNotFoundError

from pipelines.tables import LINEAGE

LINEAGE_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("asset", pa.string()),
        ("partition", pa.string()),
        ("table", pa.string()),
        ("version_written", pa.int64()),
        ("input_versions", pa.string()),  # JSON {table: version}
        ("code_version", pa.string()),
        ("config_hash", pa.string()),
        ("counts", pa.string()),  # JSON {name: int}
        ("written_at", pa.timestamp("us", tz="UTC")),
    ]
)


def s3_storage_options_from_env() -> dict[str, str]:
    """Delta/object-store options from the standard AWS variables. Values are never logged."""
    opts: dict[str, str] = {}
    mapping = {
        "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN": "AWS_SESSION_TOKEN",
        "AWS_REGION": "AWS_REGION",
        "AWS_DEFAULT_REGION": "AWS_REGION",
        "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3": "AWS_ENDPOINT_URL",
        "AWS_ALLOW_HTTP": "AWS_ALLOW_HTTP",
    }
    for env, key in mapping.items():
        if os.environ.get(env):
            opts.setdefault(key, os.environ[env])
    if opts.get("AWS_ENDPOINT_URL", "").startswith("http://"):
        opts.setdefault("AWS_ALLOW_HTTP", "true")
    # Concurrent commits to one table (two Dagster runs, the review app beside an asset) are safe by S3's
    # conditional writes: each Delta log entry is put with If-None-Match, so of two writers racing for one version
    # one wins and the other retries on the next (AWS S3 since 2024, MinIO, R2, Ceph; tested against moto).
    # A store without conditional writes: a DynamoDB locking provider (AWS_S3_LOCKING_PROVIDER=dynamodb), or, for a
    # single writer only, AWS_S3_ALLOW_UNSAFE_RENAME=true; either, set in the environment, replaces this default.
    for env in ("AWS_S3_LOCKING_PROVIDER", "DELTA_DYNAMO_TABLE_NAME", "AWS_S3_ALLOW_UNSAFE_RENAME", "AWS_CONDITIONAL_PUT"):
        if os.environ.get(env):
            opts.setdefault(env, os.environ[env])
    if not any(k in opts for k in ("AWS_S3_LOCKING_PROVIDER", "AWS_S3_ALLOW_UNSAFE_RENAME", "AWS_CONDITIONAL_PUT",
                                   "conditional_put")):
        opts["conditional_put"] = "etag"
    return opts


def code_version() -> str:
    """git commit of the project when available, else the package version."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("synpref")
    except PackageNotFoundError:
        return "unknown"


def config_hash(config: Any) -> str:
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


FrameT = TypeVar("FrameT", pl.DataFrame, pl.LazyFrame)


def latest_by_key(frame: FrameT, keys: str | list[str], order: str = "created_at") -> FrameT:
    """The newest row per key of an append-only table (later rows supersede earlier ones; history kept). Eager or
    lazy: the one way every table here is read "latest per key"."""
    return frame.sort(order).unique(keys, keep="last")


@dataclass
class Lake:
    """Delta tables under `root`. `storage_options` are passed to deltalake and polars alike."""

    root: str
    storage_options: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = self.root.rstrip("/")
        if self.is_remote and not self.storage_options:
            self.storage_options = s3_storage_options_from_env()
        if not self.is_remote:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    @property
    def is_remote(self) -> bool:
        return "://" in self.root and not self.root.startswith("file://")

    def uri(self, table: str) -> str:
        return f"{self.root}/{table}"

    # --- reading ---------------------------------------------------------------------------------------------
    def exists(self, table: str) -> bool:
        return self.version(table) is not None

    def version(self, table: str) -> int | None:
        try:
            return DeltaTable(self.uri(table), storage_options=self.storage_options).version()
        except TableNotFoundError:
            return None

    def delta(self, table: str, version: int | None = None) -> DeltaTable:
        return DeltaTable(self.uri(table), version=version, storage_options=self.storage_options)

    def scan(self, table: str, version: int | None = None) -> pl.LazyFrame:
        """Lazy scan; `version` time-travels. Raises if the table does not exist."""
        return pl.scan_delta(self.uri(table), version=version, storage_options=self.storage_options or None)

    def read(self, table: str, version: int | None = None, columns: list[str] | None = None) -> pl.DataFrame:
        lf = self.scan(table, version)
        if columns:
            lf = lf.select(columns)
        return lf.collect()

    def read_or_empty(self, table: str, schema: pa.Schema, columns: list[str] | None = None) -> pl.DataFrame:
        if not self.exists(table):
            df = pl.from_arrow(schema.empty_table())
            return df.select(columns) if columns else df
        return self.read(table, columns=columns)

    # --- writing ---------------------------------------------------------------------------------------------
    def _arrow(self, data: pl.DataFrame | pa.Table, schema: pa.Schema | None) -> pa.Table:
        table = data.to_arrow() if isinstance(data, pl.DataFrame) else data
        if schema is not None:
            table = table.select(schema.names).cast(schema)
        return table

    def append(self, table: str, data: pl.DataFrame | pa.Table, schema: pa.Schema | None = None,
               partition_by: list[str] | None = None, schema_mode: str | None = None) -> int:
        """Append rows (ledgers, lineage). Returns the new table version. `schema_mode="merge"` lets a table
        gain columns (older rows read them as null)."""
        arrow = self._arrow(data, schema)
        for attempt in range(3):
            try:
                write_deltalake(self.uri(table), arrow, mode="append", partition_by=partition_by,
                                schema_mode=schema_mode, storage_options=self.storage_options)
                break
            except CommitFailedError as e:
                # Two writers creating the table at once: both commit version 0 with the table's metadata and the
                # loser fails with "Metadata changed" (delta-rs retries append-vs-append conflicts itself, not this
                # one). Its commit wrote no log entry, so appending again to the table the winner made loses and
                # doubles nothing.
                if "Metadata changed" not in str(e) or attempt == 2:
                    raise
        return self.version(table)  # type: ignore[return-value]

    def append_batches(self, table: str, batches: Iterable[pa.RecordBatch], schema: pa.Schema) -> int:
        """Append a stream of record batches in one commit without holding them all (manifests of 26M ids)."""
        write_deltalake(self.uri(table), pa.RecordBatchReader.from_batches(schema, batches), mode="append",
                        storage_options=self.storage_options)
        return self.version(table)  # type: ignore[return-value]

    def overwrite(self, table: str, data: pl.DataFrame | pa.Table, schema: pa.Schema | None = None,
                  partition_by: list[str] | None = None, predicate: str | None = None) -> int:
        """Replace the whole table, or only the rows matching `predicate` (a partition's slice)."""
        arrow = self._arrow(data, schema)
        write_deltalake(self.uri(table), arrow, mode="overwrite", partition_by=partition_by, predicate=predicate,
                        schema_mode=None if predicate else "overwrite", storage_options=self.storage_options)
        return self.version(table)  # type: ignore[return-value]

    def replace_where(self, table: str, data: pl.DataFrame | pa.Table, column: str, value: str | int | list,
                      schema: pa.Schema | None = None, schema_mode: str | None = None) -> int:
        """Replace the rows with `column == value` (or `column IN value` for a list) by `data` in one commit
        (idempotent per value, and it costs the rows of that value, not the table: Delta skips files whose
        statistics cannot match). An empty `data` removes them. This is how a shard-at-a-time stage commits a
        shard. `schema_mode="merge"` lets `data` add a column (older rows read it as null)."""
        arrow = self._arrow(data, schema)
        if not self.exists(table):
            return self.append(table, arrow)

        def lit(v) -> str:
            return str(v) if isinstance(v, int) else "'" + str(v).replace("'", "''") + "'"

        predicate = (f"{column} IN ({', '.join(lit(v) for v in value)})" if isinstance(value, list)
                     else f"{column} = {lit(value)}")
        write_deltalake(self.uri(table), arrow, mode="overwrite", predicate=predicate, schema_mode=schema_mode,
                        storage_options=self.storage_options)
        return self.version(table)  # type: ignore[return-value]

    def merge_insert(self, table: str, data: pl.DataFrame | pa.Table, keys: Iterable[str],
                     schema: pa.Schema | None = None, partition_by: list[str] | None = None) -> dict[str, int]:
        """Insert rows whose keys are new; existing keys are left as they are (idempotent re-ingest).

        Returns {"inserted": n, "version": v}. Creates the table on first write.
        """
        out = self._merge(table, data, keys, schema, partition_by, update=False)
        return {"inserted": out["inserted"], "version": out["version"]}

    def upsert(self, table: str, data: pl.DataFrame | pa.Table, keys: Iterable[str],
               schema: pa.Schema | None = None, partition_by: list[str] | None = None) -> dict[str, int]:
        """Insert new keys and update existing ones (derived tables recomputed for the same key)."""
        return self._merge(table, data, keys, schema, partition_by, update=True)

    def _merge(self, table: str, data: pl.DataFrame | pa.Table, keys: Iterable[str], schema: pa.Schema | None,
               partition_by: list[str] | None, update: bool) -> dict[str, int]:
        """One Delta MERGE on `keys`: new keys inserted, existing ones updated when `update`. Creates the table."""
        arrow = self._arrow(data, schema)
        if not self.exists(table):
            write_deltalake(self.uri(table), arrow, mode="append", partition_by=partition_by,
                            storage_options=self.storage_options)
            return {"inserted": arrow.num_rows, "updated": 0, "version": self.version(table)}  # type: ignore[dict-item]
        if arrow.num_rows == 0:
            return {"inserted": 0, "updated": 0, "version": self.version(table)}  # type: ignore[dict-item]
        merge = self.delta(table).merge(arrow, predicate=" AND ".join(f"t.{k} = s.{k}" for k in keys),
                                        source_alias="s", target_alias="t")
        if update:
            merge = merge.when_matched_update_all()
        metrics = merge.when_not_matched_insert_all().execute()
        return {"inserted": int(metrics.get("num_target_rows_inserted", 0)),
                "updated": int(metrics.get("num_target_rows_updated", 0)),
                "version": self.version(table)}  # type: ignore[dict-item]

    # --- lineage ---------------------------------------------------------------------------------------------
    def record_lineage(self, *, run_id: str, asset: str, partition: str | None, table: str,
                       version_written: int | None, inputs: dict[str, int | None], config: Any,
                       counts: dict[str, int]) -> int:
        row = {
            "run_id": [run_id],
            "asset": [asset],
            "partition": [partition or ""],
            "table": [table],
            "version_written": [version_written],
            "input_versions": [json.dumps(inputs, sort_keys=True)],
            "code_version": [code_version()],
            "config_hash": [config_hash(config)],
            "counts": [json.dumps(counts, sort_keys=True)],
            "written_at": [datetime.now(timezone.utc)],
        }
        return self.append(LINEAGE, pa.table(row, schema=LINEAGE_SCHEMA))

    def lineage(self, asset: str | None = None) -> pl.DataFrame:
        df = self.read_or_empty(LINEAGE, LINEAGE_SCHEMA)
        return df.filter(pl.col("asset") == asset) if asset else df

    def input_versions(self, tables: Iterable[str]) -> dict[str, int | None]:
        return {t: self.version(t) for t in tables}

    def row_count(self, table: str) -> int:
        """Rows of a table from the Delta log's per-file counts (no data file opened), scanning only where a file
        lacks the statistic; 0 for a table not written yet."""
        if not self.exists(table):
            return 0
        n = pa.table(self.delta(table).get_add_actions(flatten=True)).column("num_records")
        if n.null_count == 0:
            return int(pc.sum(n).as_py() or 0)
        return int(self.scan(table).select(pl.len()).collect().item())


def now_utc() -> datetime:
    return datetime.now(timezone.utc)

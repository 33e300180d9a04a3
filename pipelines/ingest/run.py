"""Ingest one shard: read -> parse -> check -> decontaminate -> dedup -> append to `raw_pairs`.

Counts reconcile: candidates = kept + already_present + duplicates + quarantined, where a candidate is a parsed
pair (or an unparseable row). `already_present` are this shard's own rows from an earlier (possibly
interrupted) run, which is what makes a rerun a no-op.

Dedup is exact on `pair_id` across every source. The lake table itself is the state; to avoid a MERGE join
against the whole table for every batch we probe a compact in-memory set of 64-bit id prefixes (8 bytes a
pair) and confirm the few hits exactly against Delta, which also yields the kept row's provenance for the
`duplicates` table. Writers are serialized by the `ingest` Dagster pool, so probe-then-append is safe.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np
import polars as pl
import pyarrow as pa

from pipelines.ingest.checks import Reason, RowError, check_candidate
from pipelines.ingest.decontaminate import NgramIndex
from pipelines.ingest.formats import PARSERS, ParseStats, apply_mapping, detect_format
from pipelines.ingest.readers import RawRecord, iter_records
from pipelines.lake import Lake, now_utc
from pipelines.schema import DUPLICATES_SCHEMA, QUARANTINE_SCHEMA, RAW_PAIRS_SCHEMA, LabelOrigin, pair_id

RAW = "raw_pairs"
QUARANTINE = "quarantine"
DUPLICATES = "duplicates"


@dataclass
class IngestReport:
    source: str
    shard: str
    format: str = ""
    rows_read: int = 0
    candidates: int = 0
    kept: int = 0
    already_present: int = 0
    duplicates: int = 0
    quarantined: int = 0
    ties_dropped: int = 0
    quarantine_by_reason: dict[str, int] = field(default_factory=dict)
    contaminated_by_benchmark: dict[str, int] = field(default_factory=dict)
    version: int | None = None

    @property
    def reconciles(self) -> bool:
        return self.candidates == self.kept + self.already_present + self.duplicates + self.quarantined

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reconciles"] = self.reconciles
        return d


class IdIndex:
    """Sorted uint64 prefixes of pair ids already in the lake: a probe, confirmed exactly on hits."""

    def __init__(self, ids: Iterable[str] = ()):
        self._sorted = np.unique(np.fromiter((int(i[:16], 16) for i in ids), dtype=np.uint64))
        self._pending: list[np.ndarray] = []

    @staticmethod
    def keys(ids: list[str]) -> np.ndarray:
        return np.fromiter((int(i[:16], 16) for i in ids), dtype=np.uint64, count=len(ids))

    def maybe_contains(self, keys: np.ndarray) -> np.ndarray:
        self._flush()
        if self._sorted.size == 0:
            return np.zeros(keys.shape, dtype=bool)
        pos = np.searchsorted(self._sorted, keys)
        pos[pos >= self._sorted.size] = 0
        return self._sorted[pos] == keys

    def add(self, keys: np.ndarray) -> None:
        self._pending.append(keys)

    def _flush(self) -> None:
        if self._pending:
            self._sorted = np.union1d(self._sorted, np.concatenate(self._pending))
            self._pending = []

    def __len__(self) -> int:
        self._flush()
        return int(self._sorted.size)


def load_id_index(lake: Lake) -> IdIndex:
    if not lake.exists(RAW):
        return IdIndex()
    ids = lake.scan(RAW).select("pair_id").collect()["pair_id"].to_list()
    return IdIndex(ids)


def _quarantine_row(source: str, shard: str, row: int, reason: str, detail: str, payload: Any,
                    pid: str | None, run_id: str, stage: str = "ingest") -> dict[str, Any]:
    if not isinstance(payload, str):
        payload = json.dumps(payload, ensure_ascii=False, default=str)
    return {"source": source, "shard": shard, "source_row": row, "stage": stage, "reason": reason,
            "detail": detail[:500], "payload": payload, "pair_id": pid or "", "run_id": run_id,
            "quarantined_at": now_utc()}


def ingest_shard(lake: Lake, path: str, *, source: str, shard: str, run_id: str, fmt: str | None = None,
                 mapping: dict[str, str] | None = None, decontam: NgramIndex | None = None,
                 max_chars: int = 200_000, batch_size: int = 50_000, id_index: IdIndex | None = None,
                 write: bool = True) -> IngestReport:
    """Ingest the file at `path` as shard `shard` of `source`. Idempotent: rerunning adds nothing."""
    report = IngestReport(source=source, shard=shard)
    index = id_index if id_index is not None else load_id_index(lake)
    stats = ParseStats()
    quarantine: list[dict[str, Any]] = []
    duplicates: list[dict[str, Any]] = []
    parser = PARSERS[fmt] if fmt else None
    report.format = fmt or ""
    ingested_at = now_utc()

    for batch in iter_records(path, batch_size):
        report.rows_read += len(batch)
        rows: dict[str, list[Any]] = {k: [] for k in RAW_PAIRS_SCHEMA.names}
        seen_in_batch: dict[str, int] = {}
        for rec in batch:
            if rec.record is None:
                report.candidates += 1
                quarantine.append(_quarantine_row(source, shard, rec.row, Reason.UNDECODABLE.value,
                                                  rec.error or "", rec.payload or "", None, run_id))
                continue
            record = apply_mapping(rec.record, mapping)
            if parser is None:
                try:
                    report.format = detect_format(record)
                except ValueError as e:
                    raise ValueError(f"{path}: {e}") from e
                parser = PARSERS[report.format]
            try:
                cands = parser(record, stats)
            except RowError as e:
                report.candidates += 1
                quarantine.append(_quarantine_row(source, shard, rec.row, e.reason.value, e.detail, rec.record,
                                                  None, run_id))
                continue
            for c in cands:
                report.candidates += 1
                pid = pair_id(c.history, c.chosen, c.rejected)
                try:
                    check_candidate(c.history, c.chosen, c.rejected, max_chars)
                    if decontam is not None:
                        hit = decontam.match("\n".join(m["content"] for m in c.history))
                        if hit is not None:
                            report.contaminated_by_benchmark[hit] = report.contaminated_by_benchmark.get(hit, 0) + 1
                            raise RowError(Reason.CONTAMINATED, f"shares a 13-gram with benchmark {hit!r}")
                except RowError as e:
                    quarantine.append(_quarantine_row(source, shard, rec.row, e.reason.value, e.detail, rec.record,
                                                      pid, run_id))
                    continue
                if pid in seen_in_batch:
                    report.duplicates += 1
                    duplicates.append({"source": source, "shard": shard, "source_row": rec.row, "pair_id": pid,
                                       "kept_source": source, "kept_shard": shard,
                                       "kept_source_row": seen_in_batch[pid], "run_id": run_id})
                    continue
                seen_in_batch[pid] = rec.row
                rows["pair_id"].append(pid)
                rows["history"].append(c.history)
                rows["chosen"].append(c.chosen)
                rows["rejected"].append(c.rejected)
                rows["source"].append(source)
                rows["shard"].append(shard)
                rows["source_row"].append(rec.row)
                rows["label_origin"].append(LabelOrigin.DATASET.value)
                rows["category_hint"].append(c.category_hint)
                rows["ingest_run_id"].append(run_id)
                rows["ingested_at"].append(ingested_at)

        if not rows["pair_id"]:
            continue
        table = pa.table(rows, schema=RAW_PAIRS_SCHEMA)
        keys = IdIndex.keys(rows["pair_id"])
        maybe = index.maybe_contains(keys)
        if maybe.any():
            hit_ids = [rows["pair_id"][i] for i in np.flatnonzero(maybe)]
            existing = (
                lake.scan(RAW).filter(pl.col("pair_id").is_in(hit_ids))
                .select("pair_id", "source", "shard", "source_row").collect()
            ) if lake.exists(RAW) else pl.DataFrame(schema={"pair_id": pl.String, "source": pl.String,
                                                            "shard": pl.String, "source_row": pl.Int64})
            kept_of = {r["pair_id"]: r for r in existing.iter_rows(named=True)}
            drop = np.zeros(len(keys), dtype=bool)
            for i in np.flatnonzero(maybe):
                pid = rows["pair_id"][i]
                k = kept_of.get(pid)
                if k is None:
                    continue  # a 64-bit prefix collision, not a duplicate
                drop[i] = True
                if k["shard"] == shard and k["source"] == source and k["source_row"] == rows["source_row"][i]:
                    report.already_present += 1
                else:
                    report.duplicates += 1
                    duplicates.append({"source": source, "shard": shard, "source_row": rows["source_row"][i],
                                       "pair_id": pid, "kept_source": k["source"], "kept_shard": k["shard"],
                                       "kept_source_row": k["source_row"], "run_id": run_id})
            table = table.filter(pa.array(~drop))
            keys = keys[~drop]
        report.kept += table.num_rows
        if write and table.num_rows:
            report.version = lake.append(RAW, table, RAW_PAIRS_SCHEMA, partition_by=["source"])
        index.add(keys)

    report.quarantined = len(quarantine)
    report.ties_dropped = stats.ties_dropped
    for q in quarantine:
        report.quarantine_by_reason[q["reason"]] = report.quarantine_by_reason.get(q["reason"], 0) + 1
    if write:
        if quarantine:
            lake.merge_insert(QUARANTINE, pa.Table.from_pylist(quarantine, QUARANTINE_SCHEMA),
                              keys=["shard", "source_row", "stage", "reason", "pair_id"], schema=QUARANTINE_SCHEMA)
        if duplicates:
            lake.merge_insert(DUPLICATES, pa.Table.from_pylist(duplicates, DUPLICATES_SCHEMA),
                              keys=["shard", "source_row", "pair_id"], schema=DUPLICATES_SCHEMA)
        report.version = lake.version(RAW)
    return report


def decontam_index_from_lake(lake: Lake, table: str = "benchmark_prompts") -> NgramIndex | None:
    if not lake.exists(table):
        return None
    df = lake.read(table, columns=["benchmark", "prompt"])
    return NgramIndex.build(list(df.iter_rows()))

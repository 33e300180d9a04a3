"""Ingest one shard: read -> parse -> check -> decontaminate -> dedup -> append to `raw_pairs`.

Counts reconcile: candidates = kept + already_present + duplicates + quarantined, where a candidate is a parsed
pair (or an unparseable row). `already_present` are this shard's own rows from an earlier (possibly
interrupted) run, which is what makes a rerun a no-op.

Dedup is exact on `pair_id` across every source. Rather than a MERGE join against the whole table for every
batch, the ids already in the lake are loaded once into `IdIndex` (exact 128-bit keys with their source, shard
and row: 28 bytes a pair), which answers both "seen before?" and "where is the kept copy?" in memory. Writers
are serialized by the `ingest` Dagster pool, so probe-then-append is safe.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import polars as pl

from pipelines.ingest.checks import RowError, check_frame
from pipelines.ingest.decontaminate import NgramIndex
from pipelines.ingest.formats import PARSERS, ParseStats, apply_mapping, detect_format
from pipelines.ingest.readers import RawRecord, iter_batches, read_ahead
from pipelines.lake import Lake, now_utc
from pipelines.schema import (DUPLICATES_SCHEMA, HISTORY_DTYPE, QUARANTINE_SCHEMA, RAW_PAIRS_SCHEMA, LabelOrigin,
                             Reason, item_pair_ids, pair_ids)

from pipelines.tables import BENCHMARK_ITEMS, BENCHMARK_PROMPTS, DUPLICATES, QUARANTINE, RAW  # noqa: F401


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
    """Every pair id in the lake with where it lives: exact 128-bit keys + (source, shard) code + source row.

    28 bytes a pair, kept as sorted chunks (one per ingested batch, merged every `merge_every` chunks), so a
    probe is a binary search per chunk and a duplicate's kept row is known without reading the lake: ingest
    stays O(N log N) however many duplicates there are (confirming hits against Delta was O(N) a batch).
    """

    def __init__(self, merge_every: int = 16):
        self.places: list[tuple[str, str]] = []  # code -> (source, shard)
        self._code: dict[tuple[str, str], int] = {}
        self.chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # hi, lo, place, row
        self.merge_every = merge_every
        # sorted chunks read from a persisted index (memory-mapped, never merged in memory: see idstore.py) and
        # the duplicate keys they were known to hold when built; `chunks` are then only this run's new keys
        self.frozen: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.frozen_duplicates = 0

    @staticmethod
    def split(ids: pl.Series | list[str]) -> tuple[np.ndarray, np.ndarray]:
        s = pl.Series(ids, dtype=pl.String) if not isinstance(ids, pl.Series) else ids
        df = pl.DataFrame({"k": s}).select(hi=pl.col("k").str.slice(0, 16).str.to_integer(base=16, dtype=pl.UInt64),
                                           lo=pl.col("k").str.slice(16, 16).str.to_integer(base=16, dtype=pl.UInt64))
        return df["hi"].to_numpy(), df["lo"].to_numpy()

    def place(self, source: str, shard: str) -> int:
        key = (source, shard)
        if key not in self._code:
            self._code[key] = len(self.places)
            self.places.append(key)
        return self._code[key]

    def add(self, hi: np.ndarray, lo: np.ndarray, place: np.ndarray, row: np.ndarray) -> None:
        if hi.size == 0:
            return
        o = np.argsort(hi, kind="stable")
        self.chunks.append((hi[o], lo[o], place[o].astype(np.int32), row[o].astype(np.int64)))
        if len(self.chunks) > self.merge_every:
            hi, lo, pc, rw = (np.concatenate([c[i] for c in self.chunks]) for i in range(4))
            o = np.argsort(hi, kind="stable")
            self.chunks = [(hi[o], lo[o], pc[o], rw[o])]

    def lookup(self, hi: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(place code, row) of each key already indexed, (-1, -1) where absent. Exact on all 128 bits.

        The probes are sorted once, so each chunk's binary searches walk it in order (numpy narrows each search
        by the previous one): 5x less time than probing in arrival order (1.4 -> 0.3 s for 1M pairs)."""
        place = np.full(hi.shape, -1, dtype=np.int32)
        row = np.full(hi.shape, -1, dtype=np.int64)
        if hi.size == 0:
            return place, row
        o = np.argsort(hi, kind="stable")
        s_hi, s_lo = hi[o], lo[o]
        s_place, s_row = place[o], row[o]
        for c_hi, c_lo, c_pl, c_rw in [*self.frozen, *self.chunks]:
            left = np.searchsorted(c_hi, s_hi, side="left")
            first = np.minimum(left, c_hi.size - 1)
            todo = (c_hi[first] == s_hi) & (s_place < 0)
            exact = todo & (c_lo[first] == s_lo)  # the usual case, vectorized: one entry per high half
            s_place[exact], s_row[exact] = c_pl[first[exact]], c_rw[first[exact]]
            for i in np.flatnonzero(todo & ~exact):  # equal high halves: (astronomically) rare
                j = left[i] + 1
                while j < c_hi.size and c_hi[j] == s_hi[i]:
                    if c_lo[j] == s_lo[i]:
                        s_place[i], s_row[i] = c_pl[j], c_rw[j]
                        break
                    j += 1
        place[o], row[o] = s_place, s_row
        return place, row

    def __len__(self) -> int:
        return int(sum(c[0].size for c in [*self.frozen, *self.chunks]))

    def duplicate_keys(self) -> int:
        """Keys held more than once (each extra copy counted): a sort of the 128-bit keys, no string hashing, so
        the raw table's uniqueness check costs O(N log N) numpy on ids already in memory.

        With a persisted index, only the in-memory keys are sorted and probed against the frozen ones (whose own
        duplicates were counted when they were built): the check costs this run's keys, not the lake's."""
        if not self.chunks:
            return self.frozen_duplicates
        hi, lo = (np.concatenate([c[i] for c in self.chunks]) for i in range(2))
        o = np.lexsort((lo, hi))
        hi, lo = hi[o], lo[o]
        repeat = (hi[1:] == hi[:-1]) & (lo[1:] == lo[:-1])
        within = int(repeat.sum())
        against = 0
        if self.frozen:  # each distinct in-memory key also frozen is one more copy
            first = np.concatenate([[True], ~repeat])
            fresh, self.chunks = self.chunks, []
            try:
                against = int((self.lookup(hi[first], lo[first])[0] >= 0).sum())
            finally:
                self.chunks = fresh
        return self.frozen_duplicates + within + against


def load_id_index(lake: Lake) -> IdIndex:
    """The index of everything already in raw_pairs, read column-wise (no per-row Python objects)."""
    index = IdIndex()
    if not lake.exists(RAW):
        return index
    df = lake.scan(RAW).select("pair_id", "source", "shard", "source_row").collect()
    places = df.select("source", "shard").unique(maintain_order=True)
    places = places.with_columns(code=pl.Series([index.place(*r) for r in places.iter_rows()], dtype=pl.Int32))
    code = df.join(places, on=["source", "shard"], how="left", maintain_order="left")["code"]
    hi, lo = IdIndex.split(df["pair_id"])
    index.add(hi, lo, code.to_numpy(), df["source_row"].to_numpy())
    return index


CAND_SCHEMA = {"row": pl.Int64, "history": HISTORY_DTYPE, "chosen": pl.String, "rejected": pl.String,
               "category_hint": pl.String, "margin": pl.Float64, "payload": pl.String}


def _q_frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"row": pl.Int64, "reason": pl.String, "detail": pl.String,
                                      "payload": pl.String, "pair_id": pl.String})


def _columnar_candidates(frame: pl.DataFrame, start: int, mapping: dict[str, str] | None,
                         fmt: str | None) -> pl.DataFrame | None:
    """Fast path: string prompt/chosen/rejected columns become candidates without per-row Python."""
    if fmt not in (None, "trl"):
        return None
    cols = {k: (mapping or {}).get(k, k) for k in ("prompt", "chosen", "rejected", "category")}
    if not all(cols[k] in frame.columns and frame.schema[cols[k]] in (pl.String, pl.Null)
               for k in ("prompt", "chosen", "rejected")):
        return None
    category = pl.col(cols["category"]).cast(pl.String) if cols["category"] in frame.columns else pl.lit(None, pl.String)
    mcol = (mapping or {}).get("margin", "margin")
    margin = pl.col(mcol).cast(pl.Float64, strict=False) if mcol in frame.columns else pl.lit(None, pl.Float64)
    return frame.select(
        row=pl.int_range(start, start + frame.height, dtype=pl.Int64),
        history=pl.concat_list(pl.struct(role=pl.lit("user"), content=pl.col(cols["prompt"]).cast(pl.String))),
        chosen=pl.col(cols["chosen"]).cast(pl.String),
        rejected=pl.col(cols["rejected"]).cast(pl.String),
        category_hint=category,
        margin=margin,
        payload=pl.lit(None, pl.String),  # filled only for refused rows (see _with_payload)
    )


def _with_payload(refused: pl.DataFrame, batch) -> pl.DataFrame:
    """Raw row JSON for refused rows of a columnar batch (computed for the few, not for every row)."""
    if batch.frame is None or refused.height == 0 or refused["payload"].null_count() == 0:
        return refused
    raw = batch.frame.select(payload=pl.struct(pl.all()).struct.json_encode())["payload"]
    return refused.with_columns(payload=pl.coalesce("payload", raw.gather(refused["row"] - batch.start)))


def _margin(v) -> float | None:
    """A source's stated preference strength as a float, or None (never a guess)."""
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def _record_candidates(records: list[RawRecord], parser_box: list, fmt: str | None, mapping: dict[str, str] | None,
                       stats: ParseStats, quarantine: list[dict[str, Any]], path: str) -> pl.DataFrame:
    """Per-row path (message lists, hh transcripts, UltraFeedback, broken lines): parse in Python."""
    out: list[dict[str, Any]] = []
    for rec in records:
        if rec.record is None:
            quarantine.append({"row": rec.row, "reason": Reason.UNDECODABLE.value, "detail": rec.error or "",
                               "payload": rec.payload or "", "pair_id": ""})
            continue
        record = apply_mapping(rec.record, mapping)
        if parser_box[0] is None:
            try:
                parser_box[1] = detect_format(record)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from e
            parser_box[0] = PARSERS[parser_box[1]]
        payload = json.dumps(rec.record, ensure_ascii=False, default=str)
        try:
            cands = parser_box[0](record, stats)
        except RowError as e:
            quarantine.append({"row": rec.row, "reason": e.reason.value, "detail": e.detail, "payload": payload,
                               "pair_id": ""})
            continue
        for c in cands:
            out.append({"row": rec.row, "history": c.history, "chosen": c.chosen, "rejected": c.rejected,
                        "category_hint": None if c.category_hint is None else str(c.category_hint),
                        "margin": _margin(c.extra.get("score_gap", record.get("margin"))),
                        "payload": payload})
    return pl.DataFrame(out, schema=CAND_SCHEMA)


def ingest_shard(lake: Lake, path: str, *, source: str, shard: str, run_id: str, fmt: str | None = None,
                 mapping: dict[str, str] | None = None, decontam: NgramIndex | None = None,
                 max_chars: int = 200_000, batch_size: int = 50_000, id_index: IdIndex | None = None,
                 write: bool = True) -> IngestReport:
    """Ingest the file at `path` as shard `shard` of `source`. Idempotent: rerunning adds nothing.

    Batch by batch: candidates (columnar where the layout allows, else parsed per row), structural checks,
    decontamination, exact dedup inside the batch and against everything ingested before, then the append; the
    quarantine and the duplicates are written once, at the end, for the whole shard."""
    run = _ShardIngest(lake, path, source=source, shard=shard, run_id=run_id, fmt=fmt, mapping=mapping,
                       decontam=decontam, max_chars=max_chars,
                       index=id_index if id_index is not None else load_id_index(lake), write=write)
    # The Delta write of batch i overlaps the parsing/hashing of batch i+1 (deltalake releases the GIL); the
    # index already knows batch i, so dedup never depends on the write having landed.
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending: Future | None = None
        for batch in read_ahead(iter_batches(path, batch_size)):
            ok = run.checked(batch)
            ok = run.decontaminated(ok, batch)
            ok = run.first_in_batch(ok)
            if ok.height == 0:
                continue
            ok, hi, lo, rows_ = run.new_to_the_index(ok)
            run.report.kept += ok.height
            if write and ok.height:
                if pending is not None:
                    pending.result()
                pending = writer.submit(lake.append, RAW, run.raw_rows(ok).to_arrow(), RAW_PAIRS_SCHEMA, ["source"])
            run.index.add(hi, lo, np.full(hi.shape, run.index.place(source, shard), dtype=np.int32), rows_)
        if pending is not None:
            pending.result()
    return run.finish()


class _ShardIngest:
    """The state of one shard's ingest (report, parse stats, the rows set aside) and its steps, one per method."""

    def __init__(self, lake: Lake, path: str, *, source: str, shard: str, run_id: str, fmt: str | None,
                 mapping: dict[str, str] | None, decontam: NgramIndex | None, max_chars: int, index: IdIndex,
                 write: bool):
        self.lake, self.path, self.source, self.shard, self.run_id = lake, path, source, shard, run_id
        self.fmt, self.mapping, self.decontam, self.max_chars, self.index, self.write = \
            fmt, mapping, decontam, max_chars, index, write
        self.report = IngestReport(source=source, shard=shard, format=fmt or "")
        self.stats = ParseStats()
        self.quarantine: list[pl.DataFrame] = []
        self.duplicates: list[pl.DataFrame] = []
        self.parser_box: list = [PARSERS[fmt] if fmt else None, fmt]
        self.ingested_at = now_utc()

    def candidates(self, batch) -> pl.DataFrame:
        """The batch's candidate pairs; rows that cannot become one are set aside with their reason."""
        self.report.rows_read += len(batch)
        bad_rows: list[dict[str, Any]] = []
        cands = None
        if batch.frame is not None:
            cands = _columnar_candidates(batch.frame, batch.start, self.mapping, self.fmt)
            if cands is not None and not self.report.format:
                self.report.format = "trl"
        if cands is None:
            cands = _record_candidates(batch.as_records(), self.parser_box, self.fmt, self.mapping, self.stats,
                                       bad_rows, self.path)
            self.report.format = self.report.format or (self.parser_box[1] or "")
        self.report.candidates += cands.height + len(bad_rows)
        if bad_rows:
            self.quarantine.append(_q_frame(bad_rows))
        return cands

    def checked(self, batch) -> pl.DataFrame:
        """Candidates that pass the structural checks, with their pair_id; the refused are quarantined."""
        checked = check_frame(self.candidates(batch), self.max_chars)
        refused = checked.filter(pl.col("reason").is_not_null())
        ok = checked.filter(pl.col("reason").is_null()).drop("reason", "detail")
        if refused.height:
            refused = _with_payload(refused, batch)
            self.quarantine.append(refused.select("row", "reason", "detail", "payload", pair_id=pl.lit("")))
        return ok.with_columns(pair_id=pair_ids(ok))

    def decontaminated(self, ok: pl.DataFrame, batch) -> pl.DataFrame:
        """Drops (to quarantine) a pair that is a benchmark comparison or shares a 13-gram with a benchmark prompt."""
        decontam, report = self.decontam, self.report
        if decontam is None or not len(decontam) or not ok.height:
            return ok
        hit = decontam.match_frame(ok.select(pl.col("history").list.eval(
            pl.element().struct.field("content")).list.join("\n")).to_series())
        ok = ok.with_columns(bench=decontam.match_pairs(ok["pair_id"]).fill_null(hit))
        dirty = ok.filter(pl.col("bench").is_not_null())
        for b, n in dirty.group_by("bench").len().iter_rows():
            report.contaminated_by_benchmark[b] = report.contaminated_by_benchmark.get(b, 0) + n
        if dirty.height:
            dirty = _with_payload(dirty, batch)
            self.quarantine.append(dirty.select("row", reason=pl.lit(Reason.CONTAMINATED.value),
                                                detail=pl.format("a comparison of, or shares a 13-gram with, "
                                                                 "benchmark '{}'", "bench"),
                                                payload="payload", pair_id="pair_id"))
        return ok.filter(pl.col("bench").is_null()).drop("bench")

    def first_in_batch(self, ok: pl.DataFrame) -> pl.DataFrame:
        """Exact dedup inside the batch: the first row of a pair_id is kept, the others recorded as duplicates."""
        first = ok.select(pl.col("pair_id").is_first_distinct()).to_series()
        if first.all():
            return ok
        kept_row = ok.filter(first).select("pair_id", kept_row="row")
        self.duplicates.append(ok.filter(~first).join(kept_row, on="pair_id").select(
            "pair_id", source_row="row", kept_source=pl.lit(self.source), kept_shard=pl.lit(self.shard),
            kept_source_row="kept_row"))
        self.report.duplicates += int((~first).sum())
        return ok.filter(first)

    def new_to_the_index(self, ok: pl.DataFrame):
        """Against everything ingested before (this run's earlier batches included), exactly, in memory: this
        very row seen before is a rerun (already present), another row with the pair_id a duplicate. Returns the
        new rows and their id halves and source rows, for the index."""
        index, report = self.index, self.report
        hi, lo = IdIndex.split(ok["pair_id"])
        rows_ = ok["row"].to_numpy()
        place, kept_row = index.lookup(hi, lo)
        hit = place >= 0
        if not hit.any():  # column-wise: a shard that is mostly duplicates costs no Python object per row
            return ok, hi, lo, rows_
        me = index.place(self.source, self.shard)
        same = hit & (place == me) & (kept_row == rows_)
        dup = np.flatnonzero(hit & ~same)
        report.already_present += int(same.sum())
        report.duplicates += int(dup.size)
        if dup.size:
            where = pl.DataFrame({"code": np.arange(len(index.places), dtype=np.int32),
                                  "kept_source": [p[0] for p in index.places],
                                  "kept_shard": [p[1] for p in index.places]})
            self.duplicates.append(pl.DataFrame({"pair_id": ok["pair_id"].gather(dup), "source_row": rows_[dup],
                                                 "code": place[dup], "kept_source_row": kept_row[dup]})
                                   .join(where, on="code", how="left").drop("code"))
        return ok.filter(pl.Series(~hit)), hi[~hit], lo[~hit], rows_[~hit]

    def raw_rows(self, ok: pl.DataFrame) -> pl.DataFrame:
        return ok.select(
            "pair_id", "history", "chosen", "rejected", source=pl.lit(self.source), shard=pl.lit(self.shard),
            source_row="row", label_origin=pl.lit(LabelOrigin.DATASET.value), category_hint="category_hint",
            margin="margin", ingest_run_id=pl.lit(self.run_id),
            ingested_at=pl.lit(self.ingested_at, dtype=pl.Datetime("us", "UTC")))

    def finish(self) -> IngestReport:
        """The shard's quarantine (MERGE on its key) and duplicates (this shard's rows replaced in one commit),
        and the report."""
        report, lake, source, shard, run_id = self.report, self.lake, self.source, self.shard, self.run_id
        q = pl.concat(self.quarantine) if self.quarantine else _q_frame([])
        report.quarantined = q.height
        report.ties_dropped = self.stats.ties_dropped
        report.quarantine_by_reason = dict(q.group_by("reason").len().sort("reason").iter_rows())
        if not self.write:
            return report
        if q.height:
            qt = q.select(source=pl.lit(source), shard=pl.lit(shard), source_row="row", stage=pl.lit("ingest"),
                          reason="reason", detail=pl.col("detail").str.slice(0, 500), payload="payload",
                          pair_id="pair_id", run_id=pl.lit(run_id),
                          quarantined_at=pl.lit(now_utc(), dtype=pl.Datetime("us", "UTC")))
            lake.merge_insert(QUARANTINE, qt.to_arrow(), keys=["shard", "source_row", "stage", "reason", "pair_id"],
                              schema=QUARANTINE_SCHEMA)
        if self.duplicates:  # a rerun finds the same duplicates: the cost is the shard's, not the table's, where
            # a MERGE would scan every shard's duplicates so far
            dups = pl.concat(self.duplicates, how="diagonal_relaxed").select(
                source=pl.lit(source), shard=pl.lit(shard), source_row=pl.col("source_row").cast(pl.Int64),
                pair_id="pair_id", kept_source="kept_source", kept_shard="kept_shard",
                kept_source_row=pl.col("kept_source_row").cast(pl.Int64), run_id=pl.lit(run_id))
            lake.replace_where(DUPLICATES, dups.to_arrow(), "shard", shard, schema=DUPLICATES_SCHEMA)
        report.version = lake.version(RAW)
        return report


def decontam_index_from_lake(lake: Lake, table: str = BENCHMARK_PROMPTS) -> NgramIndex | None:
    """The benchmarks' first-turn prompts (13-grams) and their comparisons' pair ids (exact matches)."""
    if not lake.exists(table):
        return None
    df = lake.read(table, columns=["benchmark", "prompt"])
    pairs = None
    if lake.exists(BENCHMARK_ITEMS):
        pairs = item_pair_ids(lake.read(BENCHMARK_ITEMS))
    return NgramIndex.build(list(df.iter_rows()), pairs=pairs)

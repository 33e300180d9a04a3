"""Keeps the review store (SQLite) in step with the lake: new queue batches with everything an item page shows
(text, LLM attributes, pre-checks, read once per batch by semi-joins, never per request), and new ledger rows.

The ledger is followed by Delta data file: each call reads only files this process has not read yet (an append is
one new file; a compaction rewrites known rows into a new file, read once and skipped row by row by verdict_id), so
a sync costs what changed, not the ledger. Verdicts written elsewhere (another server, `synpref review import`, a
Dagster run) reach the app within one sync period."""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field

import polars as pl

from pipelines.annotate.attributes import attributes
from pipelines.lake import Lake
from pipelines.review.ledger import VERDICT_SCHEMA, VERDICTS
from pipelines.review.queue import QUEUE
from pipelines.review.store import ReviewStore
from pipelines.tables import PRECHECKS, RAW


@dataclass
class LakeSync:
    lake: Lake
    store: ReviewStore
    _ledger_files: set[str] = field(default_factory=set)
    _versions: dict[str, int | None] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def sync(self) -> dict[str, int]:
        """One pass; returns what it brought in."""
        with self._lock:
            items = self._queue()
            verdicts = self._ledger()
            checks = self._checks(force=items > 0)
        return {"items": items, "verdicts": verdicts, "checks": checks}

    def _changed(self, table: str) -> bool:
        v = self.lake.version(table)
        if v is None or self._versions.get(table) == v:
            return False
        self._versions[table] = v
        return True

    def _queue(self) -> int:
        if not self._changed(QUEUE):
            return 0
        known = sorted(self.store.queue_versions())
        new = self.lake.scan(QUEUE).filter(~pl.col("queue_version").is_in(known)).collect()
        if new.height == 0:
            return 0
        for col in ("history", "chosen", "rejected"):  # queues written before the text travelled with them
            if col not in new.columns:
                new = new.with_columns(pl.lit(None).alias(col))
        missing = new.filter(pl.col("chosen").is_null()).select("pair_id")
        if missing.height:  # one semi-join for the batch, never a raw_pairs scan per item shown
            text = (self.lake.scan(RAW).join(missing.lazy(), on="pair_id", how="semi")
                    .select("pair_id", "history", "chosen", "rejected").collect())
            new = new.drop("history", "chosen", "rejected").join(text, on="pair_id", how="left")
        attrs = attributes(self.lake, new.select("pair_id")).collect()
        new = new.join(attrs.select("pair_id", ann_category="task_category", desired_attributes="desired_attributes",
                                    guideline="guideline"), on="pair_id", how="left").with_columns(
            task_category=pl.coalesce("ann_category", "task_category"),
            desired=pl.col("desired_attributes").list.join("; ").fill_null(""),
            guideline=pl.col("guideline").fill_null(""))
        return self.store.add_items(new)

    def _checks(self, force: bool) -> int:
        if not (self._changed(PRECHECKS) or (force and self.lake.exists(PRECHECKS))):
            return 0
        version = self.store.current_version()
        ids = pl.DataFrame({"pair_id": self.store.open_pair_ids(version)}, schema={"pair_id": pl.String})
        if ids.height == 0:
            return 0
        pc = (self.lake.scan(PRECHECKS).filter(pl.col("status") == "ok").join(ids.lazy(), on="pair_id", how="semi")
              .sort("created_at").collect())
        checks: dict[str, dict[str, str]] = defaultdict(dict)
        for r in pc.iter_rows(named=True):  # the latest per (pair, side) wins
            checks[r["pair_id"]][r["side"]] = f"{r['verdict']} ({r['model']}): {r['reason']}"
        self.store.set_checks(dict(checks))
        return len(checks)

    def _ledger(self) -> int:
        if not self._changed(VERDICTS):
            return 0
        files = self.lake.delta(VERDICTS).file_uris()
        new = [f for f in files if f not in self._ledger_files]
        added = 0
        for i in range(0, len(new), 256):
            chunk = new[i:i + 256]
            df = pl.read_parquet(chunk, storage_options=self.lake.storage_options or None, missing_columns="insert",
                                 columns=list(VERDICT_SCHEMA))
            added += self.store.add_verdicts(df)
            self._ledger_files.update(chunk)
        return added

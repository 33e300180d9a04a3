"""The review app's serving store: the open queue, who holds which item (leases), and each pair's votes, in one
SQLite file next to the app, so a request reads the rows of the item it shows and nothing else.

Why SQLite, not a Delta lease table: a lease must be granted atomically (two annotators asking at once must get
different items) within a request's latency. SQLite gives that with `BEGIN IMMEDIATE` (one writer at a time, across
threads *and* processes on the host: `uvicorn --workers N` or two `synpref review serve` on one machine share it),
in well under a millisecond. A Delta lease table would make every item shown a conditional commit (~10-30 ms locally,
~100 ms+ on S3, one log entry per view, a conflict-retry loop per race) for state that is disposable: a lost lease
only returns an item to the queue. The durable record stays in Delta: every verdict is appended to the ledger
(`human_verdicts`) *before* the store is told, and the store re-reads what it lacks from the ledger (incrementally,
by Delta data file), so deleting the SQLite file loses nothing. Limitation, stated: the store is per host; run one
review host per lake (a single server process handles far more annotators than a team has: benchmarks/RESULTS.md).

Item state, per pair: `need` annotators (2 for the queue's `overlap` share, else 1), `n_done` of them voted,
`open` while n_done < need, `disputed` when the annotators' latest labels differ (routed to the adjudication
queue), `adjudicated` once a lead's verdict is in. A lease (pair, annotator, kind, expires_at) is granted only
while need > n_done + live leases, and never to an annotator who already voted on the pair: two annotators share
an item only when it is meant for two.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import polars as pl

from pipelines.review.ledger import ADJUDICATOR_ROLE

SCHEMA = """
CREATE TABLE IF NOT EXISTS items(
    pair_id TEXT PRIMARY KEY, queue_version TEXT NOT NULL, priority INTEGER NOT NULL, need INTEGER NOT NULL,
    payload TEXT NOT NULL, checks TEXT, n_done INTEGER NOT NULL DEFAULT 0, open INTEGER NOT NULL DEFAULT 1,
    disputed INTEGER NOT NULL DEFAULT 0, adjudicated INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS items_open ON items(queue_version, open, priority);
CREATE INDEX IF NOT EXISTS items_dispute ON items(disputed, adjudicated, queue_version, priority);
CREATE TABLE IF NOT EXISTS verdicts(
    verdict_id TEXT PRIMARY KEY, pair_id TEXT NOT NULL, annotator TEXT NOT NULL, role TEXT NOT NULL,
    prefers TEXT NOT NULL, note TEXT, created_at REAL NOT NULL, seconds REAL, queue_version TEXT);
CREATE INDEX IF NOT EXISTS verdicts_pair ON verdicts(pair_id, created_at);
CREATE TABLE IF NOT EXISTS votes(
    pair_id TEXT NOT NULL, annotator TEXT NOT NULL, role TEXT NOT NULL, prefers TEXT NOT NULL, note TEXT,
    created_at REAL NOT NULL, queue_version TEXT, PRIMARY KEY(pair_id, annotator));
CREATE INDEX IF NOT EXISTS votes_annotator ON votes(annotator, queue_version);
CREATE TABLE IF NOT EXISTS leases(
    pair_id TEXT NOT NULL, annotator TEXT NOT NULL, kind TEXT NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY(pair_id, annotator));
CREATE INDEX IF NOT EXISTS leases_expiry ON leases(expires_at);
CREATE INDEX IF NOT EXISTS leases_annotator ON leases(annotator, kind);
"""

# one set-based refresh of the derived columns of the pairs in temp table `touched`
_REFRESH = f"""
UPDATE items SET
    n_done = (SELECT count(*) FROM votes v WHERE v.pair_id = items.pair_id AND v.role != '{ADJUDICATOR_ROLE}'),
    disputed = (SELECT count(DISTINCT v.prefers) > 1 FROM votes v
                WHERE v.pair_id = items.pair_id AND v.role != '{ADJUDICATOR_ROLE}'),
    adjudicated = EXISTS (SELECT 1 FROM votes v WHERE v.pair_id = items.pair_id AND v.role = '{ADJUDICATOR_ROLE}')
WHERE pair_id IN (SELECT pair_id FROM touched);
UPDATE items SET open = (n_done < need) WHERE pair_id IN (SELECT pair_id FROM touched);
UPDATE votes SET queue_version = (SELECT i.queue_version FROM items i WHERE i.pair_id = votes.pair_id)
WHERE pair_id IN (SELECT t.pair_id FROM touched t JOIN items i ON i.pair_id = t.pair_id);
"""
# (a vote's batch is its item's: imported verdicts carry no queue version)


@dataclass
class Lease:
    pair_id: str
    kind: str  # annotate | adjudicate
    expires_at: float
    renewed: bool  # the annotator already held it (a reload, a second tab)



def _renew_held(c, annotator: str, kind: str, expires_at: float) -> "Lease | None":
    """The lease of this kind the annotator already holds, renewed to `expires_at`; None when they hold none."""
    held = c.execute("SELECT pair_id FROM leases WHERE annotator = ? AND kind = ?", (annotator, kind)).fetchone()
    if held is None:
        return None
    c.execute("UPDATE leases SET expires_at = ? WHERE pair_id = ? AND annotator = ?", (expires_at, held[0], annotator))
    return Lease(held[0], kind, expires_at, True)

class ReviewStore:
    """Thread-safe (a connection per thread) and process-safe (SQLite's file lock) serving state."""

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time):
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self._local = threading.local()
        self._conn().executescript(SCHEMA)  # idempotent; outside a transaction (executescript commits)

    # --- connections -------------------------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across app crashes; the ledger is the record
            c.row_factory = sqlite3.Row
            self._local.conn = c
        return c

    class _Tx:
        def __init__(self, conn: sqlite3.Connection):
            self.c = conn

        def __enter__(self) -> sqlite3.Connection:
            self.c.execute("BEGIN IMMEDIATE")  # the write lock up front: no upgrade deadlock between processes
            return self.c

        def __exit__(self, exc_type, exc, tb) -> None:
            self.c.execute("ROLLBACK" if exc_type else "COMMIT")

    def _tx(self) -> "ReviewStore._Tx":
        return ReviewStore._Tx(self._conn())

    # --- loading (from the queue and the ledger) -------------------------------------------------------------------
    def queue_versions(self) -> set[str]:
        return {r[0] for r in self._conn().execute("SELECT DISTINCT queue_version FROM items")}

    def current_version(self) -> str:
        row = self._conn().execute("SELECT max(queue_version) FROM items").fetchone()
        return row[0] or ""

    def add_items(self, queue: pl.DataFrame) -> int:
        """queue: review_queue rows (with their text). Items already known keep their state."""
        if queue.height == 0:
            return 0
        rows = []
        for r in queue.iter_rows(named=True):
            payload = {k: r.get(k) for k in ("history", "chosen", "rejected", "why", "task_category", "objectivity",
                                             "controversiality", "desired", "guideline")}
            rows.append((r["pair_id"], r["queue_version"], int(r["priority"]), 2 if r.get("overlap") else 1,
                         json.dumps(payload)))
        with self._tx() as c:
            c.executemany("INSERT OR IGNORE INTO items(pair_id, queue_version, priority, need, payload) "
                          "VALUES(?, ?, ?, ?, ?)", rows)
            # verdicts synced before their queue (an import, a second server) count at once
            self._refresh(c, [r[0] for r in rows])
        return len(rows)

    def set_checks(self, checks: dict[str, dict[str, str]]) -> None:
        """LLM pre-checks per pair ({side: text}), written by review_queue after the queue itself."""
        with self._tx() as c:
            c.executemany("UPDATE items SET checks = ? WHERE pair_id = ?",
                          [(json.dumps(v), k) for k, v in checks.items()])

    def add_verdicts(self, verdicts: pl.DataFrame) -> int:
        """Ledger rows (VERDICT_SCHEMA); rows already known (by verdict_id) are skipped. Returns rows new here."""
        if verdicts.height == 0:
            return 0
        v = verdicts.sort("created_at").with_columns(ts=pl.col("created_at").dt.epoch("us") / 1e6)
        rows = list(zip(v["verdict_id"], v["pair_id"], v["annotator"], v["role"], v["prefers"], v["note"], v["ts"],
                        v["seconds_spent"], v["queue_version"]))
        with self._tx() as c:
            before = c.total_changes
            c.executemany("INSERT OR IGNORE INTO verdicts VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            new = c.total_changes - before
            if new:
                c.executemany(
                    "INSERT INTO votes(pair_id, annotator, role, prefers, note, created_at, queue_version) "
                    "VALUES(?, ?, ?, ?, ?, ?, ?) ON CONFLICT(pair_id, annotator) DO UPDATE SET role = excluded.role, "
                    "prefers = excluded.prefers, note = excluded.note, created_at = excluded.created_at, "
                    "queue_version = excluded.queue_version WHERE excluded.created_at >= votes.created_at",
                    [(r[1], r[2], r[3], r[4], r[5], r[6], r[8]) for r in rows])
                # a verdict ends its author's lease on the pair
                c.executemany("DELETE FROM leases WHERE pair_id = ? AND annotator = ?", [(r[1], r[2]) for r in rows])
                self._refresh(c, list({r[1] for r in rows}))
        return new

    @staticmethod
    def _refresh(c: sqlite3.Connection, pair_ids: Iterable[str]) -> None:
        c.execute("CREATE TEMP TABLE IF NOT EXISTS touched(pair_id TEXT PRIMARY KEY)")
        c.execute("DELETE FROM touched")
        c.executemany("INSERT OR IGNORE INTO touched VALUES(?)", [(p,) for p in pair_ids])
        for stmt in _REFRESH.strip().split(";\n"):
            if stmt.strip():
                c.execute(stmt)

    # --- leases ----------------------------------------------------------------------------------------------------
    def claim(self, annotator: str, ttl_s: float, queue_version: str | None = None) -> Lease | None:
        """The annotator's live lease if they hold one (renewed), else the first open item of the current batch
        that still needs an annotator and that they have not labelled; None when there is none."""
        now = self.clock()
        version = queue_version if queue_version is not None else self.current_version()
        with self._tx() as c:
            c.execute("DELETE FROM leases WHERE expires_at <= ?", (now,))  # abandoned items go back to the queue
            if (held := _renew_held(c, annotator, "annotate", now + ttl_s)) is not None:
                return held
            row = c.execute(
                "SELECT i.pair_id FROM items i WHERE i.queue_version = ? AND i.open = 1 "
                "AND i.need > i.n_done + (SELECT count(*) FROM leases l WHERE l.pair_id = i.pair_id "
                "                         AND l.kind = 'annotate') "
                "AND NOT EXISTS (SELECT 1 FROM votes v WHERE v.pair_id = i.pair_id AND v.annotator = ?) "
                "ORDER BY i.priority LIMIT 1", (version, annotator)).fetchone()
            if row is None:
                return None
            c.execute("INSERT INTO leases VALUES(?, ?, 'annotate', ?)", (row[0], annotator, now + ttl_s))
            return Lease(row[0], "annotate", now + ttl_s, False)

    def claim_adjudication(self, lead: str, ttl_s: float) -> Lease | None:
        """The first disputed, unadjudicated pair (any batch, oldest first) not leased to another lead and not one
        the lead labelled as an annotator (an adjudicator is a third person)."""
        now = self.clock()
        with self._tx() as c:
            c.execute("DELETE FROM leases WHERE expires_at <= ?", (now,))
            if (held := _renew_held(c, lead, "adjudicate", now + ttl_s)) is not None:
                return held
            row = c.execute(
                "SELECT i.pair_id FROM items i WHERE i.disputed = 1 AND i.adjudicated = 0 "
                "AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.pair_id = i.pair_id AND l.kind = 'adjudicate') "
                "AND NOT EXISTS (SELECT 1 FROM votes v WHERE v.pair_id = i.pair_id AND v.annotator = ?) "
                "ORDER BY i.queue_version, i.priority LIMIT 1", (lead,)).fetchone()
            if row is None:
                return None
            c.execute("INSERT INTO leases VALUES(?, ?, 'adjudicate', ?)", (row[0], lead, now + ttl_s))
            return Lease(row[0], "adjudicate", now + ttl_s, False)

    def renew(self, annotator: str, pair_id: str, ttl_s: float) -> bool:
        """Extend a live lease (the page's heartbeat); False when it expired or was never held."""
        now = self.clock()
        with self._tx() as c:
            cur = c.execute("UPDATE leases SET expires_at = ? WHERE pair_id = ? AND annotator = ? AND expires_at > ?",
                            (now + ttl_s, pair_id, annotator, now))
            return cur.rowcount == 1

    def release(self, annotator: str, pair_id: str) -> bool:
        with self._tx() as c:
            return c.execute("DELETE FROM leases WHERE pair_id = ? AND annotator = ?",
                             (pair_id, annotator)).rowcount == 1

    def leases(self) -> list[dict]:
        now = self.clock()
        return [dict(r) for r in self._conn().execute(
            "SELECT pair_id, annotator, kind, expires_at FROM leases WHERE expires_at > ?", (now,))]

    def leases_of(self, annotator: str) -> list[dict]:
        now = self.clock()
        return [dict(r) for r in self._conn().execute(
            "SELECT pair_id, annotator, kind, expires_at FROM leases WHERE annotator = ? AND expires_at > ?",
            (annotator, now))]

    # --- reads for one page ----------------------------------------------------------------------------------------
    def item(self, pair_id: str) -> dict | None:
        r = self._conn().execute("SELECT * FROM items WHERE pair_id = ?", (pair_id,)).fetchone()
        if r is None:
            return None
        return {**json.loads(r["payload"]), "pair_id": r["pair_id"], "queue_version": r["queue_version"],
                "need": r["need"], "n_done": r["n_done"], "open": bool(r["open"]), "disputed": bool(r["disputed"]),
                "adjudicated": bool(r["adjudicated"]), "checks": json.loads(r["checks"]) if r["checks"] else {}}

    def open_pair_ids(self, queue_version: str) -> list[str]:
        return [r[0] for r in self._conn().execute(
            "SELECT pair_id FROM items WHERE queue_version = ? AND open = 1", (queue_version,))]

    def has_voted(self, pair_id: str, annotator: str) -> bool:
        return self._conn().execute("SELECT 1 FROM votes WHERE pair_id = ? AND annotator = ?",
                                    (pair_id, annotator)).fetchone() is not None

    def votes(self, pair_id: str) -> list[dict]:
        """Each annotator's latest label on the pair (what an adjudicator weighs)."""
        return [dict(r) for r in self._conn().execute(
            "SELECT annotator, role, prefers, note FROM votes WHERE pair_id = ? ORDER BY created_at", (pair_id,))]

    def history(self, pair_id: str) -> list[dict]:
        """Every verdict on the pair, revisions included."""
        return [dict(r) for r in self._conn().execute(
            "SELECT annotator, role, prefers, note, created_at FROM verdicts WHERE pair_id = ? ORDER BY created_at",
            (pair_id,))]

    def mine(self, annotator: str) -> list[dict]:
        return [dict(r) for r in self._conn().execute(
            "SELECT pair_id, prefers, note FROM votes WHERE annotator = ? ORDER BY created_at", (annotator,))]

    def progress(self, annotator: str, queue_version: str | None = None) -> dict:
        """Pairs the annotator labelled (all time, this batch), and what is left of the batch."""
        c = self._conn()
        version = queue_version if queue_version is not None else self.current_version()
        done = c.execute("SELECT count(*) FROM votes WHERE annotator = ? AND role != ?",
                         (annotator, ADJUDICATOR_ROLE)).fetchone()[0]
        in_batch = c.execute("SELECT count(*) FROM votes WHERE annotator = ? AND queue_version = ? AND role != ?",
                             (annotator, version, ADJUDICATOR_ROLE)).fetchone()[0]
        adjudicated = c.execute("SELECT count(*) FROM votes WHERE annotator = ? AND role = ?",
                                (annotator, ADJUDICATOR_ROLE)).fetchone()[0]
        remaining = c.execute("SELECT count(*) FROM items WHERE queue_version = ? AND open = 1",
                              (version,)).fetchone()[0]
        return {"annotator": annotator, "done": done, "in_batch": in_batch, "adjudications": adjudicated,
                "remaining": remaining, "queue_version": version,
                "awaiting_adjudication": self.awaiting_adjudication()}

    def awaiting_adjudication(self) -> int:
        return self._conn().execute("SELECT count(*) FROM items WHERE disputed = 1 AND adjudicated = 0").fetchone()[0]

    def batch_status(self, queue_version: str | None = None) -> dict:
        version = queue_version if queue_version is not None else self.current_version()
        r = self._conn().execute(
            "SELECT count(*), sum(open), sum(need = 2), sum(disputed), sum(adjudicated) FROM items "
            "WHERE queue_version = ?", (version,)).fetchone()
        return {"queue_version": version, "items": r[0] or 0, "open": r[1] or 0, "double_annotated": r[2] or 0,
                "disputed": r[3] or 0, "adjudicated": r[4] or 0}

    def verdict_frame(self, overlap_only: bool = False) -> pl.DataFrame:
        """Verdicts as a ledger-shaped frame for the lead's agreement/throughput tables: all of them, or only the
        latest votes on pairs two or more annotators labelled (agreement needs no more)."""
        c = self._conn()
        if overlap_only:
            rows = c.execute(
                "SELECT pair_id, annotator, role, prefers, created_at, 0.0 AS seconds, queue_version FROM votes "
                "WHERE pair_id IN (SELECT pair_id FROM votes WHERE role != ? GROUP BY pair_id HAVING count(*) >= 2)",
                (ADJUDICATOR_ROLE,)).fetchall()
        else:
            rows = c.execute("SELECT pair_id, annotator, role, prefers, created_at, seconds, queue_version "
                             "FROM verdicts").fetchall()
        schema = {"pair_id": pl.String, "annotator": pl.String, "role": pl.String, "prefers": pl.String,
                  "created_at": pl.Float64, "seconds_spent": pl.Float64, "queue_version": pl.String}
        return pl.DataFrame([tuple(r) for r in rows], schema=schema, orient="row")



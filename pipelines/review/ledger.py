"""The verdict ledger: every human (or simulated-reviewer) verdict appended to `human_verdicts`, never updated.

A pair may collect several verdicts, and an annotator may revise theirs: a revision is a new row, the earlier one
stays (the history is the audit trail) and only each annotator's latest verdict counts. The resolved label is
derived: an adjudication (a verdict with role `lead`, given in the app's adjudication queue) is final; otherwise
annotators who disagree leave the pair `pending` until a lead adjudicates it (never in the seed before), and a
pair they agree on takes their label (all-undecidable resolves to `discard`, as the paper discards pairs humans
cannot decide). Writes go through one lock per process, so several annotators on one review server are safe;
Delta's optimistic commits make appends from several processes (two review servers, a Dagster run importing
verdicts) safe too.

Compaction: every append is one small Parquet file and one log entry; `compact_ledger` rewrites them into one file
(delta-rs `optimize.compact`, a `dataChange=false` commit readers and concurrent appenders do not conflict with),
checkpoints the log and vacuums the replaced files, so reading the ledger costs its rows, not its history. The
writer compacts every `COMPACT_EVERY` versions, and `human_verified_seed` compacts on each materialization.
"""

from __future__ import annotations

import json
import threading
import uuid
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import polars as pl
from deltalake.exceptions import CommitFailedError
from sklearn.metrics import cohen_kappa_score

from pipelines.lake import Lake

from pipelines.tables import VERDICTS  # noqa: F401  (re-exported)
VERDICT_SCHEMA = {
    "verdict_id": pl.String, "pair_id": pl.String, "annotator": pl.String, "role": pl.String,
    "created_at": pl.Datetime("us", "UTC"), "order_shown": pl.String, "choice": pl.String, "prefers": pl.String,
    "note": pl.String, "edited_attributes": pl.String, "seconds_spent": pl.Float64, "origin": pl.String,
    "queue_version": pl.String,
}
_LOCK = threading.Lock()
COMPACT_EVERY = 200  # ledger versions between compactions (one verdict per version from the app)
LABELS = ["chosen", "rejected", "undecidable"]  # the nominal categories agreement is measured on
ADJUDICATOR_ROLE = "lead"  # a verdict with this role is an adjudication: final


@dataclass
class VerdictIn:
    pair_id: str
    annotator: str
    order_shown: str  # chosen_first | rejected_first: what the annotator saw as Candidate 1
    choice: str  # "1" | "2" | "undecidable"
    role: str = "annotator"  # annotator | lead
    note: str = ""
    edited_attributes: dict = field(default_factory=dict)
    seconds_spent: float = 0.0
    origin: str = "human"  # human | simulated
    queue_version: str = ""

    def prefers(self) -> str:
        if self.choice not in ("1", "2", "undecidable"):
            raise ValueError(f"choice must be 1, 2 or undecidable, not {self.choice!r}")
        if self.order_shown not in ("chosen_first", "rejected_first"):
            raise ValueError(f"bad order_shown {self.order_shown!r}")
        if self.choice == "undecidable":
            return "undecidable"
        return "chosen" if (self.choice == "1") == (self.order_shown == "chosen_first") else "rejected"


def verdict_rows(verdicts: list[VerdictIn]) -> pl.DataFrame:
    rows = [{
        "verdict_id": uuid.uuid4().hex, "pair_id": v.pair_id, "annotator": v.annotator, "role": v.role,
        "created_at": datetime.now(timezone.utc), "order_shown": v.order_shown, "choice": v.choice,
        "prefers": v.prefers(), "note": v.note, "edited_attributes": json.dumps(v.edited_attributes),
        "seconds_spent": float(v.seconds_spent), "origin": v.origin, "queue_version": v.queue_version,
    } for v in verdicts]
    return pl.DataFrame(rows, schema=VERDICT_SCHEMA)


def append_verdicts(lake: Lake, verdicts: list[VerdictIn], compact_every: int = COMPACT_EVERY) -> int:
    """Append in one commit; every `compact_every` versions the ledger is compacted (0: never)."""
    if not verdicts:
        return lake.version(VERDICTS) or 0
    return append_verdict_rows(lake, verdict_rows(verdicts), compact_every)


def append_verdict_rows(lake: Lake, rows: pl.DataFrame, compact_every: int = COMPACT_EVERY) -> int:
    """Append rows built by `verdict_rows` (the caller keeps their verdict ids) in one commit."""
    with _LOCK:
        before = lake.version(VERDICTS) or 0
        version = lake.append(VERDICTS, rows.to_arrow())
    if compact_every and version // compact_every > before // compact_every:  # crossed a multiple since the last
        compact_ledger(lake)
    return version


class GroupCommit:
    """Verdicts that arrive while a ledger commit is in flight go into the next commit together (leader/follower):
    each request still returns only once its own rows are committed, but N annotators submitting at once cost one
    Delta commit, not N queued one behind the other. Why: a commit is tens of ms (a Parquet file plus a log entry);
    serialized, eight sessions wait ~8 commits for each verdict."""

    def __init__(self, lake: Lake, compact_every: int = COMPACT_EVERY):
        self.lake, self.compact_every = lake, compact_every
        self._cv = threading.Condition()
        self._pending: list[dict] = []
        self._leading = False

    def append(self, rows: pl.DataFrame) -> int:
        mine = {"rows": rows, "done": False, "version": None, "error": None}
        with self._cv:
            self._pending.append(mine)
            while not mine["done"]:
                if self._leading:
                    self._cv.wait()
                    continue
                self._leading = True
                batch, self._pending = self._pending, []
                self._cv.release()
                try:
                    version, error = append_verdict_rows(self.lake, pl.concat([b["rows"] for b in batch]),
                                                         self.compact_every), None
                except Exception as e:  # every waiter of this batch gets the error: none is told it was saved
                    version, error = None, e
                finally:
                    self._cv.acquire()
                for b in batch:
                    b.update(done=True, version=version, error=error)
                self._leading = False
                self._cv.notify_all()
        if mine["error"] is not None:
            raise mine["error"]
        return mine["version"]  # type: ignore[return-value]


def compact_ledger(lake: Lake, vacuum_retention_hours: int = 1) -> dict:
    """Rewrite the ledger's small files into few (rows, ids and history unchanged), checkpoint the log, and vacuum
    files replaced more than `vacuum_retention_hours` ago (a reader still on an older snapshot has that long).
    A concurrent commit that conflicts leaves the compaction to the next call: nothing is lost either way."""
    if not lake.exists(VERDICTS):
        return {"files_before": 0, "files_after": 0, "compacted": False}
    dt = lake.delta(VERDICTS)
    before = len(dt.file_uris())
    try:
        if before > 1:
            dt.optimize.compact()
        dt.create_checkpoint()
        dt.vacuum(retention_hours=vacuum_retention_hours, enforce_retention_duration=False, dry_run=False)
    except CommitFailedError:
        return {"files_before": before, "files_after": before, "compacted": False}
    return {"files_before": before, "files_after": len(lake.delta(VERDICTS).file_uris()), "compacted": True}


def read_verdicts(lake: Lake) -> pl.DataFrame:
    if not lake.exists(VERDICTS):
        return pl.DataFrame(schema=VERDICT_SCHEMA)
    return lake.read(VERDICTS)


def resolve(verdicts: pl.DataFrame) -> pl.DataFrame:
    """Per pair: resolved (chosen | rejected | discard | pending), how (adjudication | agreement | single |
    awaiting_adjudication), n_verdicts, agreement (share of the annotators' votes on the modal label). `pending`:
    annotators disagree and no lead has adjudicated yet; the seed leaves it out until one does."""
    if verdicts.height == 0:
        return pl.DataFrame(schema={"pair_id": pl.String, "resolved": pl.String, "how": pl.String,
                                    "n_verdicts": pl.UInt32, "agreement": pl.Float64, "origin": pl.String})
    # one vote per annotator: their latest
    latest = verdicts.sort("created_at").group_by("pair_id", "annotator").agg(pl.all().last())
    lead = (latest.filter(pl.col("role") == ADJUDICATOR_ROLE).sort("created_at").group_by("pair_id")
            .agg(lead=pl.col("prefers").last()))
    votes = latest.filter(pl.col("role") != ADJUDICATOR_ROLE).group_by("pair_id").agg(
        c=(pl.col("prefers") == "chosen").sum(), r=(pl.col("prefers") == "rejected").sum(),
        u=(pl.col("prefers") == "undecidable").sum(), n_verdicts=pl.len().cast(pl.UInt32),
        origin=pl.when((pl.col("origin") == "simulated").all()).then(pl.lit("simulated")).otherwise(pl.lit("human")))
    # a pair only a lead labelled has no annotator votes: it is still resolved by the lead
    votes = votes.join(lead, on="pair_id", how="full", coalesce=True).with_columns(
        pl.col("c", "r", "u").fill_null(0), n_verdicts=pl.col("n_verdicts").fill_null(0),
        origin=pl.col("origin").fill_null("human"))
    unanimous = pl.max_horizontal("c", "r", "u") == pl.col("n_verdicts")
    agreed = (pl.when(pl.col("c") == pl.col("n_verdicts")).then(pl.lit("chosen"))
              .when(pl.col("r") == pl.col("n_verdicts")).then(pl.lit("rejected")).otherwise(pl.lit("discard")))
    lead_label = pl.when(pl.col("lead") == "undecidable").then(pl.lit("discard")).otherwise(pl.col("lead"))
    return votes.select(
        "pair_id",
        resolved=pl.when(pl.col("lead").is_not_null()).then(lead_label)
        .when(unanimous).then(agreed).otherwise(pl.lit("pending")),
        how=pl.when(pl.col("lead").is_not_null()).then(pl.lit("adjudication"))
        .when(~unanimous).then(pl.lit("awaiting_adjudication"))
        .when(pl.col("n_verdicts") >= 2).then(pl.lit("agreement")).otherwise(pl.lit("single")),
        n_verdicts=(pl.col("n_verdicts") + pl.col("lead").is_not_null().cast(pl.UInt32)).cast(pl.UInt32),
        agreement=pl.when(pl.col("n_verdicts") > 0)
        .then(pl.max_horizontal("c", "r", "u") / pl.col("n_verdicts")).otherwise(None),
        origin="origin",
    ).sort("pair_id")


def _kappa(a: np.ndarray, b: np.ndarray) -> float | None:
    """scikit-learn's Cohen's kappa; None where it is undefined (one label only: chance agreement is 1)."""
    if len(a) == 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        k = float(cohen_kappa_score(a, b, labels=LABELS, replace_undefined_by=np.nan))
    return None if np.isnan(k) else k


def overlap_votes(verdicts: pl.DataFrame) -> pl.DataFrame:
    """Each annotator's latest label on items two or more annotators labelled (adjudications left out), one row
    per ordered pair of distinct annotators: pair_id, queue_version, annotator, prefers, other, other_pref."""
    latest = (verdicts.filter(pl.col("role") != ADJUDICATOR_ROLE).sort("created_at")
              .group_by("pair_id", "annotator").agg(pl.col("prefers").last(), pl.col("queue_version").first()))
    multi = latest.filter(pl.len().over("pair_id") >= 2)
    batch = multi.group_by("pair_id").agg(batch=pl.col("queue_version").min())
    pairs = multi.join(multi.select("pair_id", other="annotator", other_pref="prefers"), on="pair_id")
    return (pairs.filter(pl.col("annotator") != pl.col("other")).join(batch, on="pair_id")
            .select("pair_id", queue_version="batch", annotator="annotator", prefers="prefers", other="other",
                    other_pref="other_pref"))


def agreement_by_annotator(verdicts: pl.DataFrame) -> pl.DataFrame:
    """Per annotator, on items they share with others: overlap_items, raw agreement with the co-annotators, and
    Cohen's kappa (scikit-learn) of their labels against the co-annotators' (chance-corrected: two people who
    always say `chosen` on a chosen-heavy queue agree a lot and learn little)."""
    schema = {"annotator": pl.String, "overlap_items": pl.UInt32, "agreement": pl.Float64, "kappa": pl.Float64}
    pairs = overlap_votes(verdicts)
    if pairs.height == 0:
        return pl.DataFrame(schema=schema)
    rows = []
    for (who,), g in pairs.group_by("annotator"):
        a, b = g["prefers"].to_numpy(), g["other_pref"].to_numpy()
        rows.append({"annotator": who, "overlap_items": g["pair_id"].n_unique(),
                     "agreement": float((a == b).mean()), "kappa": _kappa(a, b)})
    return pl.DataFrame(rows, schema=schema).sort("annotator")


def agreement_by_batch(verdicts: pl.DataFrame) -> pl.DataFrame:
    """Per queue version (batch): overlap items, raw agreement and kappa over every ordered pair of co-annotators.
    Cohen's kappa on both orders of each pair has equal marginals, i.e. Scott's pi / Fleiss' kappa: the
    chance-corrected agreement of a pool of interchangeable raters (who the two annotators are varies per item)."""
    schema = {"queue_version": pl.String, "overlap_items": pl.UInt32, "agreement": pl.Float64, "kappa": pl.Float64}
    pairs = overlap_votes(verdicts)
    if pairs.height == 0:
        return pl.DataFrame(schema=schema)
    rows = []
    for (batch,), g in pairs.group_by("queue_version"):
        a, b = g["prefers"].to_numpy(), g["other_pref"].to_numpy()
        rows.append({"queue_version": batch, "overlap_items": g["pair_id"].n_unique(),
                     "agreement": float((a == b).mean()), "kappa": _kappa(a, b)})
    return pl.DataFrame(rows, schema=schema).sort("queue_version")


def progress_by_annotator(verdicts: pl.DataFrame, queue_version: str | None = None) -> pl.DataFrame:
    """Per annotator: pairs labelled (latest verdict per pair), those in `queue_version`, verdicts written
    (revisions included), adjudications, median seconds per verdict and discards."""
    if verdicts.height == 0:
        return pl.DataFrame(schema={"annotator": pl.String, "pairs": pl.UInt32, "in_batch": pl.UInt32,
                                    "verdicts": pl.UInt32, "adjudications": pl.UInt32, "median_s": pl.Float64,
                                    "discards": pl.UInt32})
    return (verdicts.group_by("annotator").agg(
        pairs=pl.col("pair_id").n_unique().cast(pl.UInt32),
        in_batch=pl.col("pair_id").filter(pl.col("queue_version") == (queue_version or "")).n_unique().cast(pl.UInt32),
        verdicts=pl.len().cast(pl.UInt32),
        adjudications=(pl.col("role") == ADJUDICATOR_ROLE).sum().cast(pl.UInt32),
        median_s=pl.col("seconds_spent").median(),
        discards=(pl.col("prefers") == "undecidable").sum().cast(pl.UInt32)).sort("annotator"))

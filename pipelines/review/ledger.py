"""The verdict ledger: every human (or simulated-reviewer) verdict appended to `human_verdicts`, never updated.

A pair may collect several verdicts, and an annotator may revise theirs: a revision is a new row, the earlier one
stays (the history is the audit trail) and only each annotator's latest verdict counts. The resolved label is
derived: a lead's adjudication wins, otherwise the majority of annotators (ties and majority-undecidable resolve
to `discard`, as the paper discards pairs humans cannot decide). Writes go through one lock per process, so several
annotators on one review server are safe; Delta's optimistic commits make appends from several processes (two
review servers, a Dagster run importing verdicts) safe too.
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

import polars as pl

from pipelines.lake import Lake

from pipelines.tables import VERDICTS  # noqa: F401  (re-exported)
VERDICT_SCHEMA = {
    "verdict_id": pl.String, "pair_id": pl.String, "annotator": pl.String, "role": pl.String,
    "created_at": pl.Datetime("us", "UTC"), "order_shown": pl.String, "choice": pl.String, "prefers": pl.String,
    "note": pl.String, "edited_attributes": pl.String, "seconds_spent": pl.Float64, "origin": pl.String,
    "queue_version": pl.String,
}
_LOCK = threading.Lock()


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


def append_verdicts(lake: Lake, verdicts: list[VerdictIn]) -> int:
    rows = [{
        "verdict_id": uuid.uuid4().hex, "pair_id": v.pair_id, "annotator": v.annotator, "role": v.role,
        "created_at": datetime.now(timezone.utc), "order_shown": v.order_shown, "choice": v.choice,
        "prefers": v.prefers(), "note": v.note, "edited_attributes": json.dumps(v.edited_attributes),
        "seconds_spent": float(v.seconds_spent), "origin": v.origin, "queue_version": v.queue_version,
    } for v in verdicts]
    if not rows:
        return lake.version(VERDICTS) or 0
    with _LOCK:
        return lake.append(VERDICTS, pl.DataFrame(rows, schema=VERDICT_SCHEMA).to_arrow())


def read_verdicts(lake: Lake) -> pl.DataFrame:
    if not lake.exists(VERDICTS):
        return pl.DataFrame(schema=VERDICT_SCHEMA)
    return lake.read(VERDICTS)


def resolve(verdicts: pl.DataFrame) -> pl.DataFrame:
    """Per pair: resolved (chosen | rejected | discard), how (adjudication | majority), n, agreement."""
    if verdicts.height == 0:
        return pl.DataFrame(schema={"pair_id": pl.String, "resolved": pl.String, "how": pl.String,
                                    "n_verdicts": pl.UInt32, "agreement": pl.Float64, "origin": pl.String})
    # one vote per annotator: their latest
    latest = verdicts.sort("created_at").group_by("pair_id", "annotator").agg(pl.all().last())
    lead = latest.filter(pl.col("role") == "lead").group_by("pair_id").agg(lead=pl.col("prefers").last())
    votes = latest.group_by("pair_id").agg(
        c=(pl.col("prefers") == "chosen").sum(), r=(pl.col("prefers") == "rejected").sum(),
        u=(pl.col("prefers") == "undecidable").sum(), n_verdicts=pl.len().cast(pl.UInt32),
        origin=pl.when((pl.col("origin") == "simulated").all()).then(pl.lit("simulated")).otherwise(pl.lit("human")))
    votes = votes.join(lead, on="pair_id", how="left")
    majority = (pl.when((pl.col("c") > pl.col("r")) & (pl.col("c") > pl.col("u"))).then(pl.lit("chosen"))
                .when((pl.col("r") > pl.col("c")) & (pl.col("r") > pl.col("u"))).then(pl.lit("rejected"))
                .otherwise(pl.lit("discard")))
    lead_label = pl.when(pl.col("lead") == "undecidable").then(pl.lit("discard")).otherwise(pl.col("lead"))
    return votes.select(
        "pair_id",
        resolved=pl.when(pl.col("lead").is_not_null()).then(lead_label).otherwise(majority),
        how=pl.when(pl.col("lead").is_not_null()).then(pl.lit("adjudication")).otherwise(pl.lit("majority")),
        n_verdicts="n_verdicts",
        agreement=pl.max_horizontal("c", "r", "u") / pl.col("n_verdicts"),
        origin="origin",
    ).sort("pair_id")


def agreement_by_annotator(verdicts: pl.DataFrame) -> pl.DataFrame:
    """On items with 2+ annotators: how often each annotator agrees with the other annotators' majority."""
    latest = verdicts.sort("created_at").group_by("pair_id", "annotator").agg(pl.col("prefers").last())
    multi = latest.join(latest.group_by("pair_id").len(), on="pair_id").filter(pl.col("len") >= 2)
    if multi.height == 0:
        return pl.DataFrame(schema={"annotator": pl.String, "overlap_items": pl.UInt32, "agreement": pl.Float64})
    pairs = multi.join(multi.select("pair_id", other="annotator", other_pref="prefers"), on="pair_id")
    pairs = pairs.filter(pl.col("annotator") != pl.col("other"))
    return (pairs.group_by("annotator").agg(overlap_items=pl.col("pair_id").n_unique().cast(pl.UInt32),
                                            agreement=(pl.col("prefers") == pl.col("other_pref")).mean())
            .sort("annotator"))

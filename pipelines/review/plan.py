"""The next human review queue: what `review_queue` decides, as a plain function.

A queue is left alone while annotators still have open items in it (unless a new one is asked for); otherwise
the Stage-1 pool's unreviewed candidates, per category, ranked towards what the current Stage-1 RM is unsure of
or gets wrong when there is one, become queue version q<n+1>."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import polars as pl

from pipelines.lake import Lake
from pipelines.schema import pair_ids
from pipelines.tables import RAW
from pipelines.annotate.attributes import with_attributes
from pipelines.pool import pool_pairs
from pipelines.review.ledger import read_verdicts
from pipelines.review.queue import QUEUE, build_queue, queue_candidates
from pipelines.rm.registry import best_of


@dataclass
class QueuePlan:
    queue: pl.DataFrame | None  # None: the latest queue is still open and is kept
    version: str
    open_items: int = 0
    candidates: pl.DataFrame | None = None
    ranked_by: str | None = None  # rm_version whose scores ordered the candidates


def next_review_queue(lake: Lake, *, size: int, candidates_per_category: int, seed: int, stage1_fraction: float,
                      quotas: dict | None = None, overlap_frac: float = 0.1, force_new: bool = False,
                      score: Callable[[str, pl.DataFrame], pl.DataFrame] | None = None) -> QueuePlan:
    """`score(rm_version, candidates) -> rm_scores` ranks candidates when a Stage-1 RM exists."""
    verdicts = read_verdicts(lake)  # the ledger: human-sized, not pool-sized
    queued = lake.read(QUEUE) if lake.exists(QUEUE) else None
    if queued is not None and not force_new:
        latest = queued.filter(pl.col("queue_version") == queued["queue_version"].max())
        open_items = latest.join(verdicts.select("pair_id").unique(), on="pair_id", how="anti").height
        if open_items:  # annotators are still on it: a rerun must not replace their queue
            return QueuePlan(None, latest["queue_version"][0], open_items)
    candidates = queue_candidates(with_attributes(pool_pairs(lake, "stage1", stage1_fraction), lake),
                                  verdicts.select("pair_id").lazy(), candidates_per_category, seed)
    candidates = mark_label_conflicts(lake, candidates)
    scores, best = None, best_of(lake, "stage1")
    if best is not None and candidates.height and score is not None:
        scores = score(best["rm_version"], candidates)
    prev = queued["queue_version"].n_unique() if queued is not None else 0
    version = f"q{prev + 1:03d}"
    q = build_queue(candidates, size=size, queue_version=version, quotas=quotas or None, rm_scores=scores,
                    overlap_frac=overlap_frac, seed=seed)
    return QueuePlan(q, version, 0, candidates, best["rm_version"] if scores is not None else None)


def mark_label_conflicts(lake: Lake, candidates: pl.DataFrame) -> pl.DataFrame:
    """`label_conflict`: another source labelled the same comparison the other way round (its flipped twin is in
    raw_pairs). Only the candidates are hashed (their flipped ids); raw_pairs is read as one id column, streamed."""
    if candidates.height == 0 or not {"history", "chosen", "rejected"} <= set(candidates.columns):
        return candidates.with_columns(label_conflict=pl.lit(False))
    flipped = candidates.select("pair_id", flipped=pair_ids(candidates.select(
        "history", chosen="rejected", rejected="chosen")))
    twins = (lake.scan(RAW).select("pair_id").join(flipped.lazy().select(pair_id="flipped"), on="pair_id",
                                                   how="semi").collect(engine="streaming"))
    hit = flipped.join(twins.select(flipped="pair_id"), on="flipped", how="semi")["pair_id"]
    return candidates.with_columns(label_conflict=pl.col("pair_id").is_in(hit.implode()))

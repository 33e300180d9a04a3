"""The simulated reviewer: fills the verdict ledger for project-made pairs from their ground truth, through the
same write path as the review app, every verdict marked `origin = simulated`. Offline demos only."""

from __future__ import annotations

import hashlib
import random

import polars as pl

from pipelines.review.ledger import VerdictIn


def simulated_verdicts(queue: pl.DataFrame, truth: dict[str, bool], *, annotators: int = 2, error_rate: float = 0.05,
                       subjective_discard: float = 0.05, seed: int = 0) -> list[VerdictIn]:
    """queue: pair_id, objectivity, overlap, queue_version. truth: pair_id -> the stored label is right.
    Overlap items get every annotator; the others one (chosen by hash)."""
    out = []
    for r in queue.iter_rows(named=True):
        if r["pair_id"] not in truth:
            continue
        who = range(annotators) if r["overlap"] else [int(hashlib.sha256(r["pair_id"].encode()).hexdigest(), 16) % annotators]
        for a in who:
            rng = random.Random(f"{seed}|{a}|{r['pair_id']}")
            chosen_first = rng.random() < 0.5
            if r["objectivity"] != "objective" and rng.random() < subjective_discard:
                choice = "undecidable"
            else:
                better_is_stored_chosen = truth[r["pair_id"]] ^ (rng.random() < error_rate)
                choice = "1" if better_is_stored_chosen == chosen_first else "2"
            out.append(VerdictIn(pair_id=r["pair_id"], annotator=f"sim-reviewer-{a}", order_shown=(
                "chosen_first" if chosen_first else "rejected_first"), choice=choice, origin="simulated",
                seconds_spent=rng.uniform(20, 90), queue_version=r["queue_version"]))
    return out

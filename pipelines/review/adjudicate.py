"""The adjudication queue outside the app: which pairs wait for a lead, and the simulated lead that settles them in
offline demos (project-made pairs with known truth), through the same ledger path, marked origin=simulated."""

from __future__ import annotations

import random

import polars as pl

from pipelines.review.ledger import ADJUDICATOR_ROLE, VerdictIn, resolve


def awaiting_adjudication(verdicts: pl.DataFrame) -> pl.DataFrame:
    """pair_id of every pair whose annotators disagree and that no lead has adjudicated yet."""
    return resolve(verdicts).filter(pl.col("how") == "awaiting_adjudication").select("pair_id")


def simulated_adjudications(pending: pl.DataFrame, truth: dict[str, bool], *, queue_version: str = "",
                            error_rate: float = 0.0, seed: int = 0) -> list[VerdictIn]:
    """A simulated lead's verdict on each pending pair with known truth (`truth[pair_id]`: the stored label is
    right), wrong with probability `error_rate`."""
    out = []
    for pid in pending["pair_id"].to_list():
        if pid not in truth:
            continue
        rng = random.Random(f"adjudicate|{seed}|{pid}")
        chosen_first = rng.random() < 0.5
        stored_is_better = truth[pid] ^ (rng.random() < error_rate)
        out.append(VerdictIn(pair_id=pid, annotator="sim-lead", role=ADJUDICATOR_ROLE, origin="simulated",
                             order_shown="chosen_first" if chosen_first else "rejected_first",
                             choice="1" if stored_is_better == chosen_first else "2",
                             seconds_spent=rng.uniform(30, 120), queue_version=queue_version))
    return out

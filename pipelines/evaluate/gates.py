"""Judge gates: can this LLM ensemble judge at all? Two numbers on the human-verified seed, used as blocking asset
checks on `llm_judgments` so a judge that cannot judge never feeds Stage 1 or Stage 2.

- Position bias: on pairs a model saw in both orders, the share of its decisive verdicts that say "Candidate 1".
  Orders are seeded coin flips per sample, so an unbiased judge sits near 0.5 whatever its accuracy; a judge that
  always answers "Candidate 1" sits at 1.0.
- Agreement with humans: the ensemble's final verdict against the human label, on pairs it decided.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl


@dataclass
class GateStats:
    share_candidate_1: float
    balanced_pairs: int
    agreement: float
    decided_pairs: int
    decisive_share: float
    per_model: pl.DataFrame

    def position_ok(self, lo: float, hi: float) -> bool:
        return self.balanced_pairs > 0 and lo <= self.share_candidate_1 <= hi


def judge_gates(samples: pl.DataFrame, aggregated: pl.DataFrame, seed: pl.DataFrame, *,
                band: tuple[float, float] = (0.35, 0.65), min_agreement: float = 0.6) -> GateStats:
    """samples: llm_judgments rows of the seed pairs (stored orientation); aggregated: aggregate_judgments of them;
    seed: human_verified_seed (pair_id, label_flipped)."""
    ok = samples.filter((pl.col("status") == "ok") & pl.col("verdict_raw").is_in(["1", "2"]))
    both = (ok.group_by("pair_id", "model").agg(orders=pl.col("order_shown").n_unique())
            .filter(pl.col("orders") == 2).select("pair_id", "model"))
    balanced = ok.join(both, on=["pair_id", "model"], how="semi")
    share = float(balanced.select((pl.col("verdict_raw") == "1").mean()).item()) if balanced.height else float("nan")
    human = seed.select("pair_id", human=pl.when(pl.col("label_flipped")).then(pl.lit("rejected"))
                        .otherwise(pl.lit("chosen")))
    decided = aggregated.join(human, on="pair_id").filter(pl.col("final") != "undecidable")
    agreement = float((decided["final"] == decided["human"]).mean()) if decided.height else 0.0
    per_model = (samples.filter(pl.col("status") == "ok").group_by("model")
                 .agg(samples=pl.len(), undecidable=(pl.col("prefers") == "undecidable").mean(),
                      picks_candidate_1=(pl.col("verdict_raw") == "1").mean()).sort("model"))
    return GateStats(share_candidate_1=share, balanced_pairs=both.select("pair_id").n_unique() if both.height else 0,
                     agreement=agreement, decided_pairs=decided.height,
                     decisive_share=decided.height / max(aggregated.height, 1), per_model=per_model)

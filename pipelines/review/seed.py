"""The human-verified seed: resolved, non-discarded human labels joined back to their pairs, oriented so that
`chosen` is what humans preferred (D_gold of the paper), in three splits:

- `train`: the gold RM trains on it, and (as the LLMs labelled it) it starts Stage 1's silver set;
- `gold_val`: checkpoint selection of every RM and Stage 1's error-driven retrieval;
- `gold_test`: reported only — never trained on, selected on, shown to a judge as an exemplar, or put in silver.

A pair's split is a hash of its comparison id (orientation-free: (h, A, B) and its flipped twin (h, B, A) from
another source share a split), and once given it is kept: rebuilding the seed with other `val_frac`/`test_frac`
splits only comparisons not seen before, so a pair reported once is never trained on later. Annotators who
disagree keep a pair out until a lead adjudicates it; the adjudicated label is then the seed's (`how`). Two rows of one
comparison whose human-preferred responses differ are a label conflict: both are kept and marked
(`label_conflict`), never silently merged."""

from __future__ import annotations

import hashlib

import polars as pl

from pipelines.annotate.attributes import ATTRIBUTE_COLUMNS
from pipelines.review.ledger import resolve
from pipelines.schema import comparison_ids

from pipelines.tables import SEED  # noqa: F401  (re-exported)


SPLITS = ("train", "gold_val", "gold_test")


def gold_split(pair_id: str, val_frac: float, test_frac: float) -> str:
    h = int(hashlib.sha256(f"gold|{pair_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "gold_test" if h < test_frac else ("gold_val" if h < test_frac + val_frac else "train")


def build_seed(verdicts: pl.DataFrame, pairs: pl.DataFrame | pl.LazyFrame, attributes: pl.DataFrame | None,
               val_frac: float = 0.2, test_frac: float = 0.2, previous: pl.DataFrame | None = None) -> pl.DataFrame:
    """pairs: raw_pairs rows (a lazy scan is fine: only the verdicts' pairs are read). Humans may flip a pair:
    `chosen` here is always the human-preferred response, and `label_flipped` says whether that differs from the
    source's label. attributes: pair_id + the latest attributes (`pipelines.annotate.attributes.attributes`) of
    these pairs.
    previous: the seed as last written: its comparisons keep their split."""
    # discarded pairs and pairs awaiting adjudication stay out; an adjudicated pair takes the lead's label
    res = resolve(verdicts).filter(pl.col("resolved").is_in(["chosen", "rejected"]))
    picked = (pairs.lazy().select("pair_id", "history", "chosen", "rejected", "source")
              .join(res.select("pair_id").lazy(), on="pair_id", how="semi").collect())
    df = res.join(picked, on="pair_id", how="inner")
    flip = pl.col("resolved") == "rejected"
    df = df.with_columns(
        chosen=pl.when(flip).then(pl.col("rejected")).otherwise(pl.col("chosen")),
        rejected=pl.when(flip).then(pl.col("chosen")).otherwise(pl.col("rejected")),
        label_flipped=flip,
        label_origin=pl.when(pl.col("origin") == "simulated").then(pl.lit("simulated")).otherwise(pl.lit("human")),
    )
    df = df.with_columns(comparison_id=comparison_ids(df))
    df = df.with_columns(split=pl.col("comparison_id").map_elements(lambda c: gold_split(c, val_frac, test_frac),
                                                                     return_dtype=pl.String))
    if previous is not None and previous.height:
        prev = previous if "comparison_id" in previous.columns else previous.with_columns(
            comparison_id=comparison_ids(previous))
        # an older seed split by pair id: its first split per comparison stands (gold_test before others)
        kept = (prev.select("comparison_id", prev_split="split")
                .sort(pl.col("prev_split").replace_strict({"gold_test": 0, "gold_val": 1, "train": 2}))
                .unique("comparison_id", keep="first"))
        df = df.join(kept, on="comparison_id", how="left").with_columns(
            split=pl.coalesce("prev_split", "split")).drop("prev_split")
    df = df.with_columns(label_conflict=(pl.col("chosen").n_unique().over("comparison_id") > 1))
    if attributes is not None and attributes.height:
        df = df.join(attributes.select("pair_id", *ATTRIBUTE_COLUMNS), on="pair_id", how="left")
    else:
        df = df.with_columns(task_category=pl.lit(None, pl.String), objectivity=pl.lit(None, pl.String),
                             controversiality=pl.lit(None, pl.String),
                             desired_attributes=pl.lit(None, pl.List(pl.String)), guideline=pl.lit(None, pl.String))
    return df.select("pair_id", "history", "chosen", "rejected", "source", "label_origin", "label_flipped", "split",
                     "how", "n_verdicts", "agreement", "task_category", "objectivity", "controversiality",
                     "desired_attributes", "guideline", "comparison_id", "label_conflict").sort("pair_id")

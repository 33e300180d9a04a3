"""Stage 1 (paper §3.2): the human-guided iterations that grow D_silver, whole in this module.

Inputs: D_gold, the human-verified seed, in three splits (`train`: trained on; `gold_val`: checkpoint selection
and the error-driven retrieval; `gold_test`: reported only, never trained on, selected on, shown as an exemplar
or relabelled into silver), and the Stage-1 pool D_un (attributes and embeddings computed).

Bootstrap (once): D_silver = the seed's `train` split as the LLM ensemble labelled it (`llm_judgments`).
One iteration:
 1. train a BT RM on D_silver, pick the checkpoint by accuracy on gold_val;
 2. p = σ(r(y_w) − r(y_l)) on every gold_val pair;
 3. retrieve k(p) nearest unverified pool pairs per gold_val pair (k = 8 if p <= 0.5, else ceil(8·(1 − p)));
 4. judge them with the LLM ensemble, the nearest human-verified pairs (train + gold_val) as exemplars;
 5. decisive LLM labels join D_silver (oriented by the verdict).
Each iteration commits its silver rows and its `stage1_metrics` row under its iteration number (replacing what a
crashed attempt at the same iteration left), so a rerun continues after the last iteration recorded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Protocol

import numpy as np
import polars as pl

from pipelines.annotate.attributes import with_attributes
from pipelines.annotate.backends import LLMUnavailable
from pipelines.annotate.judging import aggregate_judgments
from pipelines.curate.judge import embedded, exemplar_index, judge_with_exemplars, judgments_of
from pipelines.curate.retrieve import VectorIndex, retrieve_for_gold
from pipelines.pool import pool_pairs, truth_of
from pipelines.tables import SEED, SILVER, STAGE1_JUDGMENTS, STAGE1_METRICS

SILVER_SCHEMA = {"pair_id": pl.String, "history": pl.List(pl.Struct({"role": pl.String, "content": pl.String})),
                 "chosen": pl.String, "rejected": pl.String, "label_flipped": pl.Boolean, "iteration": pl.Int64,
                 "agree_frac": pl.Float64, "task_category": pl.String, "label_origin": pl.String,
                 "judge_prompt_version": pl.String}


def judged_to_silver(pairs: pl.DataFrame, verdicts: pl.DataFrame, iteration: int, prompt_version: str,
                     min_agree: float = 0.5, label_origin: str = "llm") -> pl.DataFrame:
    """Decisive ensemble verdicts become silver pairs; `rejected` verdicts flip the stored orientation.
    pairs: pair_id, history, chosen, rejected, task_category. verdicts: aggregate_judgments output."""
    v = verdicts.filter(pl.col("final") != "undecidable")
    v = v.filter(pl.when(pl.col("final") == "chosen").then(pl.col("agree_frac") >= min_agree)
                 .otherwise((1 - pl.col("agree_frac")) >= min_agree))
    df = pairs.join(v.select("pair_id", "final", "agree_frac"), on="pair_id", how="inner")
    flip = pl.col("final") == "rejected"
    return df.select(
        "pair_id", "history",
        chosen=pl.when(flip).then(pl.col("rejected")).otherwise(pl.col("chosen")),
        rejected=pl.when(flip).then(pl.col("chosen")).otherwise(pl.col("rejected")),
        label_flipped=flip, iteration=pl.lit(iteration, pl.Int64), agree_frac="agree_frac",
        task_category=pl.col("task_category").cast(pl.String), label_origin=pl.lit(label_origin),
        judge_prompt_version=pl.lit(prompt_version),
    ).cast(SILVER_SCHEMA)


# --- the loop -----------------------------------------------------------------------------------------------------
class RewardModels(Protocol):
    """What Stage 1 needs from the RM side (the real one trains + registers in MLflow; tests pass a stand-in)."""

    def train(self, *, name: str, role: str, train: pl.DataFrame, val: pl.DataFrame,
              extra: dict) -> object: ...  # returns an object with rm_version and val_accuracy

    def score(self, rm_version: str, pairs: pl.DataFrame) -> pl.DataFrame: ...  # pair_id, p


@dataclass
class Stage1Config:
    iterations: int = 2  # iterations to run now (continuing after the last one recorded)
    k_max: int = 8
    min_agree: float = 0.5  # vote share for an LLM label to join silver
    stage1_fraction: float = 0.4
    label_origin: str = "llm"  # "simulated" when the judges are the offline simulation


@dataclass
class Stage1Result:
    iterations_run: int = 0
    silver_size: int = 0
    curve: list[dict] = field(default_factory=list)


METRICS_SCHEMA = {"iteration": pl.Int64, "rm_version": pl.String, "gold_val_accuracy": pl.Float64,
                  "gold_val_wrong": pl.Int64, "retrieved": pl.Int64, "judged": pl.Int64, "added": pl.Int64,
                  "silver_size": pl.Int64, "added_per_category": pl.String, "added_label_precision": pl.Float64,
                  "run_id": pl.String, "created_at": pl.Datetime("us", "UTC")}


def seed_splits(lake) -> dict[str, pl.DataFrame]:
    """The human seed by split: train, gold_val, gold_test (and `exemplars` = train + gold_val)."""
    seed = lake.read(SEED)
    out = {s: seed.filter(pl.col("split") == s) for s in ("train", "gold_val", "gold_test")}
    out["exemplars"] = seed.filter(pl.col("split") != "gold_test")
    return out


def as_stored(seed_rows: pl.DataFrame) -> pl.DataFrame:
    """Seed rows back in the orientation raw_pairs stores them (the seed orients by the human label): verdicts and
    the judgment cache are relative to the stored pair."""
    flip = pl.col("label_flipped")
    return seed_rows.with_columns(chosen=pl.when(flip).then(pl.col("rejected")).otherwise(pl.col("chosen")),
                                  rejected=pl.when(flip).then(pl.col("chosen")).otherwise(pl.col("rejected")))


def bootstrap_silver(lake, judging, cfg: Stage1Config) -> pl.DataFrame:
    """Iteration 0: the seed's train split as the ensemble labelled it in `llm_judgments` (never gold_val/test)."""
    train = as_stored(seed_splits(lake)["train"])
    agg = aggregate_judgments(judgments_of(lake, train, judging))
    return judged_to_silver(train, agg, 0, judging.prompt.version, cfg.min_agree, cfg.label_origin)


def run_stage1(lake, cfg: Stage1Config, rms: RewardModels, judging, *, run_id: str,
               log: Callable[[str], None] = lambda m: None) -> Stage1Result:
    """Run `cfg.iterations` Stage-1 iterations after the last recorded one (see the module docstring)."""
    splits = seed_splits(lake)
    val = splits["gold_val"]
    if val.height == 0:
        raise ValueError("Stage 1 needs gold_val pairs (human_verified_seed split gold_val) to select and retrieve")
    if not lake.exists(SILVER) or lake.scan(SILVER).select(pl.len()).collect().item() == 0:
        boot = bootstrap_silver(lake, judging, cfg)
        if boot.height == 0:
            raise ValueError("no silver pairs to start from: the seed's train split has no decisive judgments "
                             "(materialize llm_judgments first)")
        lake.replace_where(SILVER, boot.to_arrow(), "iteration", 0)
    done = lake.read(STAGE1_METRICS) if lake.exists(STAGE1_METRICS) else None
    start = int(done["iteration"].max()) if done is not None and done.height else 0
    exemplars = exemplar_index(lake, splits["exemplars"])
    result = Stage1Result()
    for it in range(start + 1, start + cfg.iterations + 1):
        silver = lake.read(SILVER).filter(pl.col("iteration") < it)
        reg = rms.train(name="synpref-stage1-rm", role="stage1", train=silver, val=val,
                        extra={"iteration": it})
        val_p = val.select("pair_id").join(rms.score(reg.rm_version, val).select("pair_id", "p"), on="pair_id")
        # the unverified Stage-1 pool: not in the seed, not in silver, not judged by an earlier (committed)
        # iteration. Verdicts that a crashed attempt at this iteration cached do not count as used: the rerun must
        # retrieve the same pairs as an uninterrupted run (and finds their verdicts in the cache)
        used = [splits["train"].select("pair_id"), splits["gold_val"].select("pair_id"),
                splits["gold_test"].select("pair_id"), silver.select("pair_id")]
        if lake.exists(STAGE1_JUDGMENTS):
            judged_at = pl.col("context").str.strip_prefix("stage1-it").cast(pl.Int64, strict=False)
            used.append(lake.scan(STAGE1_JUDGMENTS).filter(judged_at < it).select("pair_id").unique().collect())
        # retrieval runs on ids + vectors only; the text (and attributes) is read for the retrieved pairs alone
        pool_ids = with_attributes(pool_pairs(lake, "stage1", cfg.stage1_fraction, columns=["pair_id"]), lake).select(
            "pair_id").join(pl.concat(used).lazy(), on="pair_id", how="anti").collect()
        pool_e, pvecs = embedded(lake, pool_ids)
        # rows by pair id: the flat index breaks similarity ties (pairs with the same text) by row order, and the
        # anti-join's order is not stable, so without this a rerun could retrieve another of two tied pairs
        order = pool_e["pair_id"].arg_sort()
        pool_e, pvecs = pool_e[order], pvecs[order.to_numpy()]
        val_e, vvecs = embedded(lake, val_p)
        retrieved = retrieve_for_gold(val_e, vvecs, VectorIndex(pool_e["pair_id"].to_list(), pvecs), cfg.k_max)
        targets = with_attributes(pool_pairs(lake, "stage1", cfg.stage1_fraction).join(
            retrieved.select("pair_id").unique().lazy(), on="pair_id", how="semi"), lake).collect().sort("pair_id")
        try:
            agg = judge_with_exemplars(lake, targets, judging, exemplars, run_id=run_id, context=f"stage1-it{it}",
                                       table=STAGE1_JUDGMENTS)
        except LLMUnavailable as e:  # verdicts missing: the iteration commits no silver and no metrics row
            raise LLMUnavailable(f"stage1 iteration {it} NOT committed (its answered verdicts are cached; the next "
                                 f"run redoes the iteration): {e}", e.stats) from e
        new = judged_to_silver(targets, agg, it, judging.prompt.version, cfg.min_agree, cfg.label_origin)
        lake.replace_where(SILVER, new.to_arrow(), "iteration", it)
        truth = truth_of(lake, new)
        precision = (float(np.mean([truth.get(p, True) != f for p, f in zip(new["pair_id"], new["label_flipped"])]))
                     if truth and new.height else None)  # project-made data: how clean is what the LLMs added?
        row = {"iteration": it, "rm_version": reg.rm_version, "gold_val_accuracy": float(reg.val_accuracy),
               "gold_val_wrong": int((val_p["p"] <= 0.5).sum()), "retrieved": retrieved.height,
               "judged": targets.height, "added": new.height, "silver_size": silver.height + new.height,
               "added_per_category": json.dumps(dict(new.group_by("task_category").len().sort("task_category")
                                                     .iter_rows())),
               "added_label_precision": precision, "run_id": run_id, "created_at": datetime.now(timezone.utc)}
        lake.replace_where(STAGE1_METRICS, pl.DataFrame([row], schema=METRICS_SCHEMA).to_arrow(), "iteration", it)
        result.curve.append(row)
        result.iterations_run += 1
        log(f"stage1 iteration {it}: gold_val accuracy {reg.val_accuracy:.3f}, retrieved {retrieved.height}, "
            f"judged {targets.height}, +{new.height} silver")
    result.silver_size = lake.scan(SILVER).select(pl.len()).collect().item() if lake.exists(SILVER) else 0
    return result

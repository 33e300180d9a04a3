"""Human verification assets: the review queue, (simulated) verdicts, and the human-verified seed."""

import polars as pl
from pydantic import Field

import dagster as dg
from assets.annotate import llm_annotations
from assets.common import RMTrainConfig, record_written, reward_models
from assets.meta import md_table
from pipelines.annotate.attributes import attributes
from pipelines.annotate.prompts import load_prompt
from pipelines.annotate.precheck import precheck_responses
from pipelines.pool import truth_of
from pipelines.review.adjudicate import awaiting_adjudication, simulated_adjudications
from pipelines.review.ledger import (VERDICTS, agreement_by_annotator, agreement_by_batch, append_verdicts,
                                     compact_ledger, progress_by_annotator, read_verdicts)
from pipelines.review.plan import next_review_queue
from pipelines.review.queue import QUEUE
from pipelines.review.seed import SEED, SPLITS, build_seed
from pipelines.synth.reviewer import simulated_verdicts
from pipelines.tables import ANNOTATIONS, RAW, RM_REGISTRY, SYNTH_TRUTH
from resources.lake import LakeResource
from resources.llm import LLMResource
from resources.mlflow import MlflowResource
from resources.pool import PoolResource
from resources.trainer import TrainerResource


def review_progress(verdicts: pl.DataFrame, queue_version: str | None) -> dict:
    """Per-annotator progress and agreement as Dagster metadata (the lead's view, in the asset's history)."""
    agr = agreement_by_batch(verdicts)
    return {"progress_per_annotator": dg.MetadataValue.md(md_table(progress_by_annotator(verdicts, queue_version))),
            "agreement_per_batch": dg.MetadataValue.md(md_table(agr)),
            "agreement_per_annotator": dg.MetadataValue.md(md_table(agreement_by_annotator(verdicts))),
            "awaiting_adjudication": awaiting_adjudication(verdicts).height,
            "annotators": int(verdicts["annotator"].n_unique()) if verdicts.height else 0}


class QueueConfig(dg.Config):
    size: int = Field(default=240, description="Pairs to queue for human review")
    quotas: dict[str, int] = Field(default_factory=dict, description="Max pairs per task category; empty = equal shares")
    overlap_frac: float = Field(default=0.15, description="Share of items annotated twice, by two different people "
                                                          "(agreement; disagreements go to adjudication)")
    precheck: bool = Field(default=True, description="Batched LLM pre-check of each response of objective items")
    candidates_per_category: int = Field(default=400, description="Pairs per category ranked for the queue "
                                                                  "(objective/low-controversy first)")
    force_new: bool = Field(default=False, description="Queue a new batch even while the latest one has unreviewed "
                                                       "items (normally a rerun leaves an open queue as it is)")
    seed: int = 0


@dg.asset(group_name="review", kinds={"deltalake"}, deps=[llm_annotations, RAW, SYNTH_TRUTH],
          description="Pairs chosen for humans: objective/low-controversy first, category quotas, RM-uncertain "
                      "pairs preferred once a Stage-1 RM exists. A materialization appends the next batch as a new "
                      "queue version once the latest one is fully reviewed; while it is open, it is left as it is. "
                      "Reads the best registered Stage-1 RM when there is one: a feedback edge of the human-in-the-"
                      "loop cycle, which an acyclic asset graph cannot declare (recorded in lineage instead).")
def review_queue(context: dg.AssetExecutionContext, config: QueueConfig, lake_store: LakeResource,
                 llm: LLMResource, pool: PoolResource, trainer: TrainerResource,
                 mlflow_store: MlflowResource) -> dg.MaterializeResult:
    lake = lake_store.lake()

    def score(rm_version: str, candidates: pl.DataFrame) -> pl.DataFrame:
        return reward_models(lake, RMTrainConfig(), trainer, mlflow_store).score(rm_version, candidates)

    plan = next_review_queue(lake, size=config.size, candidates_per_category=config.candidates_per_category,
                             seed=config.seed, stage1_fraction=pool.stage1_fraction, quotas=config.quotas,
                             overlap_frac=config.overlap_frac, force_new=config.force_new, score=score)
    if plan.queue is None:
        return dg.MaterializeResult(metadata={
            "queue_version": plan.version, "open": plan.open_items,
            "note": "latest queue still has unreviewed items; left as it is (force_new=true queues more)",
            **review_progress(read_verdicts(lake), plan.version)})
    q, version, candidates = plan.queue, plan.version, plan.candidates
    v = lake.append(QUEUE, q.to_arrow(), schema_mode="merge")  # queues written before the text columns stay readable
    written = record_written(context, lake, "review_queue", QUEUE,
                             inputs=lake.input_versions([RAW, ANNOTATIONS, VERDICTS, RM_REGISTRY]),
                             config={**config.model_dump(), **pool.model_dump(), "rm": plan.ranked_by},
                             counts={"queued": q.height}, version=v)
    checked = 0
    if config.precheck:
        objective = candidates.join(q.filter(pl.col("objectivity") == "objective").select("pair_id"), on="pair_id")
        truth = truth_of(lake, objective)
        stats = precheck_responses(lake, objective, llm.annotator(), load_prompt("precheck_v1"), context.run.run_id,
                                   truth_of=lambda r: truth.get(r["pair_id"]))
        checked = stats.ok
    per = q.group_by("task_category", "objectivity").len().sort("task_category")
    return dg.MaterializeResult(data_version=written.data_version, metadata={
                                          **written.metadata,
                                          "queue_version": version, "queued": q.height, "prechecked_responses": checked,
                                          "candidates": candidates.height,
                                          "ranked_by_rm": plan.ranked_by or "none yet",
                                          "double_annotated": int(q["overlap"].sum()),
                                          "per_category": dg.MetadataValue.md(md_table(per)),
                                          **review_progress(read_verdicts(lake), version)})


class SimulatedReviewConfig(dg.Config):
    enabled: bool = Field(default=True, description="Fill the ledger with the simulated reviewer (offline demo). "
                                                    "Off when real annotators use `synpref review serve`.")
    annotators: int = 2
    error_rate: float = Field(default=0.05, description="Simulated human error rate")
    adjudicate: bool = Field(default=True, description="A simulated lead settles the pairs the simulated annotators "
                                                       "disagree on (the adjudication protocol, offline)")
    seed: int = 0


@dg.asset(group_name="review", kinds={"deltalake"}, deps=[review_queue, SYNTH_TRUTH],
          description="Simulated reviewer verdicts for the latest queue (project-made data only), written through "
                      "the same ledger path as the review app and marked origin=simulated.")
def simulated_review(context: dg.AssetExecutionContext, config: SimulatedReviewConfig,
                     lake_store: LakeResource) -> dg.MaterializeResult:
    lake = lake_store.lake()
    if not config.enabled:
        return dg.MaterializeResult(metadata={"verdicts": 0, "note": "disabled: humans label in the review app"})
    q = lake.read(QUEUE)
    q = q.filter(pl.col("queue_version") == q["queue_version"].max())
    q = q.join(read_verdicts(lake).select("pair_id"), on="pair_id", how="anti")
    version = q["queue_version"].max() if q.height else None
    truth = truth_of(lake, q)
    vs = simulated_verdicts(q, truth, annotators=config.annotators, error_rate=config.error_rate, seed=config.seed)
    v = append_verdicts(lake, vs)
    adjudicated = []
    if config.adjudicate and vs:
        batch = pl.DataFrame({"pair_id": [x.pair_id for x in vs]}).unique()
        ledger = read_verdicts(lake)
        pending = awaiting_adjudication(ledger.join(batch, on="pair_id", how="semi"))
        adjudicated = simulated_adjudications(pending, truth, queue_version=version or "", seed=config.seed)
        v = append_verdicts(lake, adjudicated) if adjudicated else v
    ledger = read_verdicts(lake)
    return dg.MaterializeResult(metadata={"verdicts": len(vs), "adjudications": len(adjudicated), "ledger_version": v,
                                          "unknown_truth": q.height - len({x.pair_id for x in vs}),
                                          **review_progress(ledger, version)})


class SeedConfig(dg.Config):
    val_frac: float = Field(default=0.2, description="Share of verified pairs in gold_val (checkpoint selection, "
                                                     "Stage-1 retrieval)")
    test_frac: float = Field(default=0.2, description="Share of verified pairs in gold_test (reported only)")
    min_agreement: float = Field(default=0.7, description="Blocking check: mean annotator agreement on overlap items")
    min_per_category: int = Field(default=5, description="Warn when a category has fewer verified pairs")


@dg.asset(group_name="review", kinds={"deltalake"}, deps=[simulated_review, RAW, ANNOTATIONS],
          check_specs=[
              dg.AssetCheckSpec("agreement_rate", asset="human_verified_seed", blocking=True,
                                description="annotators agree on overlap items"),
              dg.AssetCheckSpec("size_per_category", asset="human_verified_seed",
                                description="every task category has enough verified pairs")],
          description="Resolved, non-discarded human labels joined to their pairs (label_origin human, or "
                      "simulated in the demo), split into train, gold_val (selection) and gold_test (report only).")
def human_verified_seed(context: dg.AssetExecutionContext, config: SeedConfig, lake_store: LakeResource):
    lake = lake_store.lake()
    compaction = compact_ledger(lake)  # one small file per app verdict: rewritten into one before it is read
    inputs = lake.input_versions([VERDICTS, RAW, ANNOTATIONS])
    verdicts = read_verdicts(lake)
    attrs = attributes(lake, verdicts.select("pair_id").unique()).collect()
    previous = lake.read(SEED) if lake.exists(SEED) else None
    seed = build_seed(verdicts, lake.scan(RAW), attrs, config.val_frac, config.test_frac, previous=previous)
    v = lake.overwrite(SEED, seed.to_arrow())
    counts = {"verified": seed.height, **{s: int((seed["split"] == s).sum()) for s in SPLITS},
              "flipped_by_humans": int(seed["label_flipped"].sum()),
              "label_conflicts": int(seed.filter(pl.col("label_conflict"))["comparison_id"].n_unique()),
              "discarded": int(verdicts["pair_id"].n_unique() - seed.height) if verdicts.height else 0,
              "adjudicated": int((seed["how"] == "adjudication").sum())}
    written = record_written(context, lake, "human_verified_seed", SEED, inputs=inputs, config=config.model_dump(),
                             counts=counts, version=v)
    agr = agreement_by_annotator(verdicts)
    mean_agr = float(agr["agreement"].mean()) if agr.height else 1.0
    kappas = agr["kappa"].drop_nulls()
    latest = (lake.scan(QUEUE).select(pl.col("queue_version").max()).collect().item() if lake.exists(QUEUE) else None)
    per = seed.group_by("task_category").len().sort("task_category")
    small = per.filter(pl.col("len") < config.min_per_category)
    yield dg.MaterializeResult(
        data_version=written.data_version,
        metadata={**counts, **written.metadata, "per_category": dg.MetadataValue.md(md_table(per)),
                  **review_progress(verdicts, latest),
                  "ledger_files_compacted": f"{compaction['files_before']} -> {compaction['files_after']}"},
        check_results=[
            dg.AssetCheckResult(check_name="agreement_rate", passed=mean_agr >= config.min_agreement,
                                metadata={"mean_agreement": mean_agr, "annotators": agr.height,
                                          "mean_kappa": float(kappas.mean()) if kappas.len() else None}),
            dg.AssetCheckResult(check_name="size_per_category", passed=small.height == 0,
                                severity=dg.AssetCheckSeverity.WARN,
                                metadata={"small": dg.MetadataValue.md(md_table(small))}),
        ])


REVIEW_ASSETS = [review_queue, simulated_review, human_verified_seed]

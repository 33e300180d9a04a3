"""The curation jobs, the Stage-2 backfill schedule, and the sensors on new verdicts and new best RMs."""


import dagster as dg
from assets.annotate import llm_annotations
from assets.curate import llm_judgments, pair_embeddings, stage1, stage2
from assets.family import CPU_MEMBERS, FAMILY_MEMBERS, rm_evaluation
from assets.review import human_verified_seed, review_queue, simulated_review
from assets.rm import gold_rm
from pipelines.review.ledger import VERDICTS
from pipelines.rm.registry import best_of
from resources.lake import LakeResource

CURATION = dg.AssetSelection.assets(llm_annotations, review_queue, simulated_review, human_verified_seed, gold_rm,
                                    pair_embeddings, llm_judgments, stage1, stage2)
GPU_MEMBERS = [m for b, m in FAMILY_MEMBERS.items() if b not in CPU_MEMBERS]

curation_job = dg.define_asset_job(
    "curation_job", selection=CURATION,
    description="Annotate -> review queue -> (simulated) verdicts -> seed -> gold RM -> embeddings -> LLM judgments "
                "of the seed -> Stage 1 -> "
                "Stage 2 (RM scores, curated + recycled pairs).")
stage2_job = dg.define_asset_job("stage2_job", selection=dg.AssetSelection.assets(stage2),
                                 description="Stage 2 over every work unit not yet committed under the current best "
                                             "RMs (new raw shards, or every unit after a new best Stage-1 RM).")
seed_job = dg.define_asset_job("seed_job", selection=dg.AssetSelection.assets(human_verified_seed))
family_job = dg.define_asset_job("family_job", selection=dg.AssetSelection.assets(*FAMILY_MEMBERS.values()),
                                 description="Train every family member, the paper's backbones included (GPU "
                                             "machines; select one rm_family/<backbone> asset in the UI to train one).")
main_job = dg.define_asset_job(
    "main_job", selection=dg.AssetSelection.all() - dg.AssetSelection.assets(*GPU_MEMBERS),
    description="Everything end to end in one run: sources -> raw_pairs (launch over a range of shards; one run) "
                "-> annotation -> review -> seed -> gold RM -> Stage 1 -> Stage 2 -> the CPU family members -> "
                "evaluation report.")
evaluation_job = dg.define_asset_job("evaluation_job", selection=dg.AssetSelection.assets(rm_evaluation))


@dg.schedule(job=stage2_job, cron_schedule="30 2 * * *", default_status=dg.DefaultScheduleStatus.STOPPED,
             description="Nightly: bring newly ingested raw partitions through annotation, scoring and Stage 2.")
def nightly_stage2(context: dg.ScheduleEvaluationContext):
    return dg.RunRequest(run_key=f"stage2:{context.scheduled_execution_time.isoformat()}")


@dg.sensor(job=seed_job, minimum_interval_seconds=120, default_status=dg.DefaultSensorStatus.STOPPED,
           description="Rebuilds human_verified_seed whenever the verdict ledger has a new Delta version.")
def new_verdicts_sensor(context: dg.SensorEvaluationContext, lake_store: LakeResource):
    v = lake_store.lake().version(VERDICTS)
    if v is None or str(v) == context.cursor:
        return dg.SkipReason(f"ledger at version {v}; nothing new")
    return dg.SensorResult(run_requests=[dg.RunRequest(run_key=f"verdicts:{v}")], cursor=str(v))


@dg.sensor(job=stage2_job, minimum_interval_seconds=300, default_status=dg.DefaultSensorStatus.STOPPED,
           description="Re-runs Stage 2 when a new best Stage-1 RM is registered.")
def new_best_rm_sensor(context: dg.SensorEvaluationContext, lake_store: LakeResource):
    best = best_of(lake_store.lake(), "stage1")
    if best is None or best["rm_version"] == context.cursor:
        return dg.SkipReason("no new best Stage-1 RM")
    return dg.SensorResult(run_requests=[dg.RunRequest(run_key=f"best:{best['rm_version']}")],
                           cursor=best["rm_version"])

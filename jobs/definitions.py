"""Builds the one `dg.Definitions` of the project (imports flow jobs -> assets -> resources/pipelines)."""

import dagster as dg

from assets.annotate import llm_annotations
from assets.curate import CURATE_ASSETS
from assets.family import FAMILY_ASSETS
from assets.ingest import INGEST_ASSETS
from assets.review import REVIEW_ASSETS
from assets.rm import gold_rm
from jobs.curation import (curation_job, evaluation_job, family_job, main_job, new_best_rm_sensor, new_verdicts_sensor,
                           nightly_stage2, seed_job, stage2_job)
from jobs.ingest import backfill_pending_shards, ingest_job, landing_sensor
from resources.compute import ComputeResource
from resources.lake import LakeResource
from resources.llm import LLMResource
from resources.mlflow import MlflowResource
from resources.pool import PoolResource
from resources.trainer import TrainerResource

defs = dg.Definitions(
    assets=[*INGEST_ASSETS, llm_annotations, *REVIEW_ASSETS, gold_rm, *CURATE_ASSETS, *FAMILY_ASSETS],
    jobs=[main_job, ingest_job, curation_job, stage2_job, seed_job, family_job, evaluation_job],
    schedules=[backfill_pending_shards, nightly_stage2],
    sensors=[landing_sensor, new_verdicts_sensor, new_best_rm_sensor],
    resources={"lake_store": LakeResource(), "llm": LLMResource(), "trainer": TrainerResource(),
               "mlflow_store": MlflowResource(), "pool": PoolResource(), "compute": ComputeResource()},
)

"""Builds the one `dg.Definitions` of the project (imports flow jobs -> assets -> resources/pipelines).

Every resource takes the deployment's settings from the environment the code location loads in (resources/env.py:
SYNPREF_LLM_*, SYNPREF_LAKE_ROOT, SYNPREF_MLFLOW_URI, SYNPREF_RAY_ADDRESS, SYNPREF_TRAINER_*), as dg.EnvVars; the
schedules and sensors run with these same resources. No LLM is set by default: `synpref demo` chooses the simulated
judge itself, and a deployment without SYNPREF_LLM_BACKEND refuses every LLM step (docs/deployment.md)."""

from __future__ import annotations

from typing import Mapping

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
from resources.env import env_config
from resources.lake import LakeResource
from resources.llm import LLMResource
from resources.mlflow import MlflowResource
from resources.pool import PoolResource
from resources.trainer import TrainerResource


def deployment_resources(environ: Mapping[str, str] | None = None) -> dict:
    """The resources, each configured from the variables `environ` (default: this process's) sets."""
    return {"lake_store": LakeResource(**env_config("lake_store", environ)),
            "llm": LLMResource(**env_config("llm", environ)),
            "trainer": TrainerResource(**env_config("trainer", environ)),
            "mlflow_store": MlflowResource(**env_config("mlflow_store", environ)),
            "pool": PoolResource(), "compute": ComputeResource(**env_config("compute", environ))}


def build_defs(environ: Mapping[str, str] | None = None) -> dg.Definitions:
    return dg.Definitions(
        assets=[*INGEST_ASSETS, llm_annotations, *REVIEW_ASSETS, gold_rm, *CURATE_ASSETS, *FAMILY_ASSETS],
        jobs=[main_job, ingest_job, curation_job, stage2_job, seed_job, family_job, evaluation_job],
        schedules=[backfill_pending_shards, nightly_stage2],
        sensors=[landing_sensor, new_verdicts_sensor, new_best_rm_sensor],
        resources=deployment_resources(environ),
    )


defs = build_defs()

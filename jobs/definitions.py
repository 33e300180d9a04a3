"""Builds the one `dg.Definitions` of the project (imports flow jobs -> assets -> resources/pipelines)."""


import dagster as dg

from assets.ingest import INGEST_ASSETS
from jobs.ingest import backfill_pending_shards, ingest_job, landing_sensor
from resources.lake import LakeResource

defs = dg.Definitions(
    assets=[*INGEST_ASSETS],
    jobs=[ingest_job],
    schedules=[backfill_pending_shards],
    sensors=[landing_sensor],
    resources={"lake_store": LakeResource()},
)

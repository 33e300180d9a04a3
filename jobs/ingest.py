"""Landing sensor (new files -> new partitions) and the backfill schedule for pending partitions."""


import dagster as dg

from assets.ingest import raw_pairs, raw_shards
from resources.lake import LakeResource

ingest_job = dg.define_asset_job("ingest_job", selection=dg.AssetSelection.assets(raw_pairs),
                                 description="Ingest one landed shard into raw_pairs.")


@dg.sensor(job=ingest_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED,
           description="Registers every new file under the landing prefix as a raw_shards partition and ingests it.")
def landing_sensor(context: dg.SensorEvaluationContext, lake_store: LakeResource) -> dg.SensorResult:
    files = lake_store.list_landing()
    known = set(context.instance.get_dynamic_partitions(raw_shards.name))
    new = [f for f in files if f not in known]
    if not new:
        return dg.SensorResult(skip_reason=f"no new files among {len(files)} under {lake_store.landing}")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=f, run_key=f"ingest:{f}") for f in new],
        dynamic_partitions_requests=[raw_shards.build_add_request(new)],
    )


def pending_partitions(instance: dg.DagsterInstance) -> list[str]:
    """Registered raw_shards partitions that raw_pairs has never materialized."""
    done = instance.get_materialized_partitions(raw_pairs.key)
    return [p for p in instance.get_dynamic_partitions(raw_shards.name) if p not in done]


@dg.schedule(job=ingest_job, cron_schedule="0 * * * *", default_status=dg.DefaultScheduleStatus.STOPPED,
             description="Hourly: backfill raw_pairs partitions that are registered but not yet materialized.")
def backfill_pending_shards(context: dg.ScheduleEvaluationContext):
    pending = pending_partitions(context.instance)
    if not pending:
        return dg.SkipReason("no pending raw shards")
    return [dg.RunRequest(partition_key=p, run_key=f"backfill:{p}:{context.scheduled_execution_time}") for p in pending]

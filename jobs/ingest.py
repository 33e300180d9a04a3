"""Landing sensor (new files -> new partitions) and the backfill schedule for pending partitions.

Both ask for one run per contiguous block of shards (a partition range, at most `SHARDS_PER_RUN` long) rather
than one run per shard: `raw_pairs` ingests a range in one process with one decontamination index and one open
of the persisted dedup index (pipelines/ingest/idstore.py), so a tick that finds 40 new files pays the run's
fixed cost once, not 40 times. The cap bounds what a failed run has to redo (a rerun is a no-op on the shards
it already wrote).
"""

import dagster as dg
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from assets.ingest import raw_pairs, raw_shards
from resources.lake import LakeResource

SHARDS_PER_RUN = 100

ingest_job = dg.define_asset_job("ingest_job", selection=dg.AssetSelection.assets(raw_pairs),
                                 description="Ingest a range of landed shards into raw_pairs (one run, one index).")


def range_requests(keys: list[str], registered: list[str], prefix: str) -> list[dg.RunRequest]:
    """One RunRequest per block of `keys` contiguous in the registered partition order (`registered`)."""
    at = {k: i for i, k in enumerate(registered)}
    pos = sorted(at[k] for k in keys)
    blocks: list[list[int]] = []
    for p in pos:
        if blocks and p == blocks[-1][-1] + 1 and len(blocks[-1]) < SHARDS_PER_RUN:
            blocks[-1].append(p)
        else:
            blocks.append([p])
    out = []
    for b in blocks:
        first, last = registered[b[0]], registered[b[-1]]
        if first == last:
            out.append(dg.RunRequest(partition_key=first, run_key=f"{prefix}:{first}"))
        else:
            out.append(dg.RunRequest(run_key=f"{prefix}:{first}..{last}",
                                     tags={ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last}))
    return out


@dg.sensor(job=ingest_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED,
           description="Registers every new file under the landing prefix as a raw_shards partition and ingests "
                       "them: one run per tick for the new files (a partition range).")
def landing_sensor(context: dg.SensorEvaluationContext, lake_store: LakeResource) -> dg.SensorResult:
    files = lake_store.list_landing()
    registered = context.instance.get_dynamic_partitions(raw_shards.name)
    known = set(registered)
    new = [f for f in files if f not in known]
    if not new:
        return dg.SensorResult(skip_reason=f"no new files among {len(files)} under {lake_store.landing}")
    # the add request appends `new` in this order after the registered keys: one contiguous range
    return dg.SensorResult(
        run_requests=range_requests(new, [*registered, *new], "ingest"),
        dynamic_partitions_requests=[raw_shards.build_add_request(new)],
    )


def pending_partitions(instance: dg.DagsterInstance) -> list[str]:
    """Registered raw_shards partitions that raw_pairs has never materialized."""
    done = instance.get_materialized_partitions(raw_pairs.key)
    return [p for p in instance.get_dynamic_partitions(raw_shards.name) if p not in done]


@dg.schedule(job=ingest_job, cron_schedule="0 * * * *", default_status=dg.DefaultScheduleStatus.STOPPED,
             description="Hourly: backfill raw_pairs partitions that are registered but not yet materialized "
                         "(one run per contiguous block of them).")
def backfill_pending_shards(context: dg.ScheduleEvaluationContext):
    pending = pending_partitions(context.instance)
    if not pending:
        return dg.SkipReason("no pending raw shards")
    return range_requests(pending, context.instance.get_dynamic_partitions(raw_shards.name),
                          f"backfill:{context.scheduled_execution_time}")

"""Every sensor and schedule evaluated the way the daemon evaluates it (`dg.build_sensor_context` /
`build_schedule_context`) against a real lake: what it asks to run, and that its cursor stops it asking twice."""

from datetime import datetime, timezone

import dagster as dg
import polars as pl
import pytest

from jobs.curation import new_best_rm_sensor, new_verdicts_sensor, nightly_stage2
from jobs.ingest import landing_sensor
from pipelines.review.ledger import VerdictIn, append_verdicts
from pipelines.rm.registry import REGISTRY, REGISTRY_SCHEMA
from resources.lake import LakeResource


@pytest.fixture
def instance(synpref_home):
    with dg.instance_for_test() as inst:
        yield inst


def _ctx(instance, cursor=None):
    return dg.build_sensor_context(instance=instance, cursor=cursor, resources={"lake_store": LakeResource()})


def test_new_verdicts_sensor_asks_for_the_seed_once_per_ledger_version(instance):
    lake = LakeResource().lake()
    assert isinstance(new_verdicts_sensor(_ctx(instance)), dg.SkipReason)  # no ledger yet
    append_verdicts(lake, [VerdictIn(pair_id="p1", annotator="a", order_shown="chosen_first", choice="1")])
    res = new_verdicts_sensor(_ctx(instance))
    assert [r.run_key for r in res.run_requests] == ["verdicts:0"] and res.cursor == "0"
    assert isinstance(new_verdicts_sensor(_ctx(instance, res.cursor)), dg.SkipReason)
    append_verdicts(lake, [VerdictIn(pair_id="p2", annotator="a", order_shown="rejected_first", choice="2")])
    again = new_verdicts_sensor(_ctx(instance, res.cursor))
    assert [r.run_key for r in again.run_requests] == ["verdicts:1"]


def _register(lake, version: str, acc: float, role: str = "stage1"):
    lake.append(REGISTRY, pl.DataFrame([{
        "rm_version": version, "name": version.split(":")[0], "role": role, "backbone": "b", "model_uri": "u",
        "path": "p", "mlflow_run_id": "r", "registered_version": version.split(":")[1], "val_accuracy": acc,
        "train_pairs": 1, "extra": "{}", "created_at": datetime.now(timezone.utc)}], schema=REGISTRY_SCHEMA).to_arrow())


def test_new_best_rm_sensor_reruns_stage2_only_for_a_better_stage1_rm(instance):
    lake = LakeResource().lake()
    assert isinstance(new_best_rm_sensor(_ctx(instance)), dg.SkipReason)
    _register(lake, "synpref-gold-rm:1", 0.9, role="gold")  # not a Stage-1 RM
    assert isinstance(new_best_rm_sensor(_ctx(instance)), dg.SkipReason)
    _register(lake, "synpref-stage1-rm:1", 0.70)
    res = new_best_rm_sensor(_ctx(instance))
    assert [r.run_key for r in res.run_requests] == ["best:synpref-stage1-rm:1"]
    assert res.run_requests[0].job_name in (None, "stage2_job")
    _register(lake, "synpref-stage1-rm:2", 0.65)  # worse: the best is unchanged
    assert isinstance(new_best_rm_sensor(_ctx(instance, res.cursor)), dg.SkipReason)
    _register(lake, "synpref-stage1-rm:3", 0.80)
    assert [r.run_key for r in new_best_rm_sensor(_ctx(instance, res.cursor)).run_requests] == [
        "best:synpref-stage1-rm:3"]


def test_nightly_stage2_requests_one_run_per_tick(instance):
    t = datetime(2026, 12, 1, 2, 30, tzinfo=timezone.utc)
    req = nightly_stage2(dg.build_schedule_context(instance=instance, scheduled_execution_time=t))
    assert req.run_key == f"stage2:{t.isoformat()}"
    assert nightly_stage2.job_name == "stage2_job" and nightly_stage2.cron_schedule == "30 2 * * *"


def _run(instance, req):
    """Execute a sensor's RunRequest as the daemon would launch it (its partition key or range tags)."""
    from definitions import defs

    res = defs.resolve_job_def("ingest_job").execute_in_process(instance=instance, partition_key=req.partition_key,
                                                            tags=req.tags)
    assert res.success
    mat = res.asset_materializations_for_node("raw_pairs")[0].metadata
    checks = {c.check_name: c.passed for c in res.get_asset_check_evaluations()}
    assert checks == {"schema_matches": True, "pair_id_unique": True, "counts_reconcile": True}
    return {k: v.value for k, v in mat.items()}


def test_landing_sensor_ingests_a_ticks_new_shards_in_one_run_on_the_persisted_index(instance, synpref_home,
                                                                                   monkeypatch):
    import shutil

    from assets.ingest import raw_shards
    from pipelines.ingest import idstore
    from pipelines.synth.generator import write_shard

    store = LakeResource()
    lake = store.lake()
    landing = synpref_home / "landing" / "synth"
    landing.mkdir(parents=True)
    for i in range(3):
        write_shard(landing / f"s-{i}.jsonl", 60, seed=i, label_noise=0.2, bad_rows=2)
    res = landing_sensor(_ctx(instance))
    assert len(res.run_requests) == 1  # three new files, one run over their range
    instance.add_dynamic_partitions(raw_shards.name, res.dynamic_partitions_requests[0].partition_keys)
    first = _run(instance, res.run_requests[0])
    assert first["shards"] == 3 and first["kept"] > 0 and first["already_present"] == 0
    assert set(lake.lineage("raw_pairs")["partition"]) == {f"synth/s-{i}.jsonl" for i in range(3)}
    m = idstore.IdStore(lake).manifest()
    assert m["version"] == lake.version("raw_pairs") and sum(s["n"] for s in m["segments"]) == first["kept"]
    assert landing_sensor(_ctx(instance)).skip_reason  # nothing new on the next tick

    # two more files (one a copy of an ingested shard): one run, and the index is read, not rebuilt by a scan
    write_shard(landing / "s-3.jsonl", 60, seed=3, label_noise=0.2, bad_rows=2)
    shutil.copy(landing / "s-0.jsonl", landing / "s-copy.jsonl")
    res = landing_sensor(_ctx(instance))
    assert len(res.run_requests) == 1
    assert res.dynamic_partitions_requests[0].partition_keys == ["synth/s-3.jsonl", "synth/s-copy.jsonl"]
    instance.add_dynamic_partitions(raw_shards.name, res.dynamic_partitions_requests[0].partition_keys)

    def no_scan(_lake):
        raise AssertionError("the persisted index was current: no scan of raw_pairs expected")

    monkeypatch.setattr(idstore, "load_id_index", no_scan)
    second = _run(instance, res.run_requests[0])
    assert second["shards"] == 2 and second["kept"] > 0
    assert second["duplicates"] >= first["kept"] // 3  # the copy's rows are all duplicates of s-0's
    total = first["kept"] + second["kept"]
    assert lake.read("raw_pairs").height == total
    assert lake.read("raw_pairs").filter(pl.col("shard") == "synth/s-copy.jsonl").height == 0

    # rerunning the same request is a no-op: nothing kept, every row found as already present, no new version
    version = lake.version("raw_pairs")
    again = _run(instance, res.run_requests[0])
    assert again["kept"] == 0 and again["already_present"] == second["kept"]
    assert again["candidates"] == again["already_present"] + again["duplicates"] + again["quarantined"]
    assert lake.version("raw_pairs") == version and lake.read("raw_pairs").height == total


def test_backfill_schedule_asks_one_run_per_contiguous_block_of_pending_shards(instance, monkeypatch):
    import jobs.ingest as ji
    from assets.ingest import raw_shards

    keys = [f"w/{i:02d}.jsonl" for i in range(7)]
    instance.add_dynamic_partitions(raw_shards.name, keys)
    monkeypatch.setattr(ji, "pending_partitions", lambda _i: [keys[0], keys[1], keys[2], keys[4], keys[5], keys[6]])
    monkeypatch.setattr(ji, "SHARDS_PER_RUN", 2)
    t = datetime(2026, 1, 1, tzinfo=timezone.utc)
    reqs = ji.backfill_pending_shards(dg.build_schedule_context(instance=instance, scheduled_execution_time=t))
    ranges = [(r.tags.get("dagster/asset_partition_range_start", r.partition_key),
               r.tags.get("dagster/asset_partition_range_end", r.partition_key)) for r in reqs]
    # 3 is done; blocks of at most 2: [0,1], [2], [4,5], [6]
    assert ranges == [(keys[0], keys[1]), (keys[2], keys[2]), (keys[4], keys[5]), (keys[6], keys[6])]
    assert len({r.run_key for r in reqs}) == 4

"""Every sensor and schedule evaluated the way the daemon evaluates it (`dg.build_sensor_context` /
`build_schedule_context`) against a real lake: what it asks to run, and that its cursor stops it asking twice."""

from datetime import datetime, timezone

import dagster as dg
import polars as pl
import pytest

from jobs.curation import new_best_rm_sensor, new_verdicts_sensor, nightly_stage2
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

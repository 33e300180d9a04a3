from datetime import datetime
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_definitions_load():
    from definitions import defs

    repo = defs.get_repository_def()
    keys = {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()}
    assert {"synthetic_landing", "benchmarks", "raw_pairs"} <= keys


@pytest.fixture
def instance(synpref_home):
    with dg.instance_for_test() as inst:
        yield inst


def _materialize(assets, instance, partition=None, config=None):
    from definitions import defs

    res = dg.materialize(assets, instance=instance, partition_key=partition, resources=defs.resources,
                         run_config=config or {}, selection=None)
    assert res.success
    return res


def test_each_partition_twice_touches_nothing_else(instance, synpref_home):
    from assets.ingest import benchmarks, raw_pairs, raw_shards, synthetic_landing
    from resources.lake import LakeResource

    cfg = {"ops": {"synthetic_landing": {"config": {"n_pairs": 200, "n_shards": 2, "benchmark_pairs": 200}}}}
    _materialize([synthetic_landing, benchmarks], instance, config=cfg)
    shards = LakeResource().list_landing()
    assert shards == ["synth/shard-000.jsonl", "synth/shard-001.jsonl", "synth/shard-contaminated.jsonl"]
    instance.add_dynamic_partitions(raw_shards.name, shards)
    lake = LakeResource().lake()
    for key in shards:
        before = lake.read("raw_pairs").filter(pl.col("shard") != key).sort("pair_id") if lake.exists("raw_pairs") else None
        kept = []
        for attempt in range(2):
            res = _materialize([raw_pairs], instance, partition=key)
            checks = {c.check_name: c.passed for c in res.get_asset_check_evaluations()}
            assert checks == {"schema_matches": True, "pair_id_unique": True, "counts_reconcile": True}
            mat = res.asset_materializations_for_node("raw_pairs")[0]
            meta = mat.metadata
            kept.append((meta["kept"].value, meta["already_present"].value))
            # every asset reports the table it wrote the same way (assets.common.record_written): the Delta
            # version, Dagster's row count from the Delta log, and that version as the data version
            assert meta["delta_version"].value == lake.version("raw_pairs")
            assert meta["dagster/row_count"].value == lake.read("raw_pairs").height
            assert mat.tags["dagster/data_version"] == f"raw_pairs@v{lake.version('raw_pairs')}"
        # the second materialization of a shard finds every row it kept the first time, and adds none
        assert kept[0][1] == 0 and kept[1] == (0, kept[0][0]) and (key.endswith("contaminated.jsonl") or kept[0][0] > 0)
        after = lake.read("raw_pairs")
        if before is not None:
            assert after.filter(pl.col("shard") != key).sort("pair_id").equals(before)
    lin = lake.lineage("raw_pairs")
    assert lin.height == 6 and set(lin["partition"]) == set(shards)
    q = lake.read("quarantine")
    assert (q["reason"] == "contaminated").sum() >= 1  # the deliberately contaminated copies were caught


def test_landing_sensor_registers_new_files_and_schedule_finds_pending(instance, synpref_home):
    from jobs.ingest import backfill_pending_shards, landing_sensor, pending_partitions
    from resources.lake import LakeResource

    landing = synpref_home / "landing" / "web"
    landing.mkdir(parents=True)
    (landing / "a.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    (landing / "notes.txt").write_text("not a shard")
    ctx = dg.build_sensor_context(instance=instance, resources={"lake_store": LakeResource()})
    result = landing_sensor(ctx)
    assert [r.partition_key for r in result.run_requests] == ["web/a.jsonl"]
    assert result.dynamic_partitions_requests[0].partition_keys == ["web/a.jsonl"]
    instance.add_dynamic_partitions("raw_shards", ["web/a.jsonl"])
    assert landing_sensor(dg.build_sensor_context(instance=instance, resources={"lake_store": LakeResource()})).skip_reason
    assert pending_partitions(instance) == ["web/a.jsonl"]
    reqs = backfill_pending_shards(dg.build_schedule_context(instance=instance, scheduled_execution_time=datetime(2026, 1, 1)))
    assert [r.partition_key for r in reqs] == ["web/a.jsonl"]


@pytest.mark.slow
def test_materialize_raw_pairs_through_the_dagster_cli(tmp_path):
    home = tmp_path / "h"
    dh = home / "dagster"
    dh.mkdir(parents=True)
    shutil.copy(ROOT / "dagster.yaml", dh / "dagster.yaml")
    env = {**os.environ, "SYNPREF_HOME": str(home), "DAGSTER_HOME": str(dh)}
    dagster = str(Path(sys.executable).parent / "dagster")
    run = lambda *a: subprocess.run([dagster, *a], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    cfg = '{"ops": {"synthetic_landing": {"config": {"n_pairs": 100, "n_shards": 1, "benchmark_pairs": 20}}}}'
    r = run("asset", "materialize", "-m", "definitions", "--select", "synthetic_landing,benchmarks", "--config-json", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    subprocess.run([sys.executable, "-c", "import dagster as dg; dg.DagsterInstance.get().add_dynamic_partitions("
                    "'raw_shards', ['synth/shard-000.jsonl'])"], env=env, check=True, cwd=ROOT)
    r = run("asset", "materialize", "-m", "definitions", "--select", "raw_pairs", "--partition", "synth/shard-000.jsonl")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "RUN_SUCCESS" in r.stderr + r.stdout
    df = pl.read_delta(str(home / "lake" / "raw_pairs"))
    assert df.height > 50 and set(df["shard"]) == {"synth/shard-000.jsonl"}


def test_pair_id_unique_check_runs_on_the_runs_index_and_still_catches_a_duplicate(instance, synpref_home):
    """The uniqueness check no longer hashes every id of raw_pairs each run: it sorts the 128-bit keys of the run's
    dedup index (loaded once per run). A duplicate written behind ingest's back still fails it."""
    from assets.ingest import benchmarks, raw_pairs, raw_shards, synthetic_landing
    from definitions import defs
    from pipelines.ingest.run import load_id_index
    from resources.lake import LakeResource

    cfg = {"ops": {"synthetic_landing": {"config": {"n_pairs": 100, "n_shards": 2, "benchmark_pairs": 50}}}}
    _materialize([synthetic_landing, benchmarks], instance, config=cfg)
    shards = LakeResource().list_landing()
    instance.add_dynamic_partitions(raw_shards.name, shards)
    lake = LakeResource().lake()
    res = _materialize([raw_pairs], instance, partition=shards[0])
    assert {c.check_name: c.passed for c in res.get_asset_check_evaluations()}["pair_id_unique"]
    lake.append("raw_pairs", lake.read("raw_pairs").head(1))  # not through ingest
    assert load_id_index(lake).duplicate_keys() == 1
    res = dg.materialize([raw_pairs], instance=instance, partition_key=shards[1],
                         resources=defs.resources, raise_on_error=False)
    check = {c.check_name: c for c in res.get_asset_check_evaluations()}["pair_id_unique"]
    assert not check.passed and check.metadata["unique"].value == check.metadata["rows"].value - 1

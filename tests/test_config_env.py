"""The deployment is configured by its environment (issue 31.3): the Definitions' resources read SYNPREF_* as
dg.EnvVars, the API key never reaches run config or logs, and with no LLM configured an LLM step refuses instead of
judging with the simulator."""

from pathlib import Path

import dagster as dg

from tests.servers import FaultyJudge

SECRET = "sk-synpref-test-7f3a9c"


def _env(monkeypatch, **values: str) -> None:
    from resources.env import SETTINGS

    for s in SETTINGS:
        monkeypatch.delenv(s.env, raising=False)
    for k, v in values.items():
        monkeypatch.setenv(k, v)


def test_definitions_pick_up_the_deployment_from_the_environment(monkeypatch, tmp_path):
    from jobs.definitions import build_defs

    _env(monkeypatch, SYNPREF_LLM_BACKEND="openai", SYNPREF_LLM_BASE_URL="http://judge-1:8000/v1",
         SYNPREF_LLM_MODELS="Qwen/Qwen3-32B, meta-llama/Llama-3.3-70B", SYNPREF_LLM_API_KEY=SECRET,
         SYNPREF_LLM_RPM="600", SYNPREF_LLM_TPM="900000", SYNPREF_LAKE_ROOT=str(tmp_path / "lake"),
         SYNPREF_MLFLOW_URI="http://mlflow:5000", SYNPREF_RAY_ADDRESS="ray://head:10001",
         SYNPREF_TRAINER_LAUNCHER="torchrun", SYNPREF_TRAINER_NPROC_PER_NODE="8")
    defs = build_defs()
    assert SECRET not in repr(defs.resources["llm"])  # the Definitions hold the variable's name, not the key
    # compute would connect to the cluster on init: its address is checked as the EnvVar it resolves at run time
    assert isinstance(defs.resources["compute"].address, dg.EnvVar)
    assert defs.resources["compute"].address.get_value() == "ray://head:10001"
    keys = ["llm", "lake_store", "mlflow_store", "trainer"]
    with dg.build_resources({k: defs.resources[k] for k in keys}) as r:
        assert (r.llm.backend, r.llm.base_url) == ("openai", "http://judge-1:8000/v1")
        assert r.llm.model_ids == ["Qwen/Qwen3-32B", "meta-llama/Llama-3.3-70B"]
        assert (r.llm.requests_per_minute, r.llm.tokens_per_minute) == (600, 900000)
        judges = r.llm.backends()
        assert [j.model for j in judges] == r.llm.model_ids and judges[0].api_key == SECRET
        assert judges[0].requests_per_minute == 600 and SECRET not in repr(judges[0]) + repr(r.llm)
        assert r.lake_store.lake_root == str(tmp_path / "lake") and r.mlflow_store.uri == "http://mlflow:5000"
        assert (r.trainer.launcher, r.trainer.nproc_per_node) == ("torchrun", 8)


def test_sensors_run_with_the_deployments_resources(monkeypatch, tmp_path):
    """new_verdicts_sensor, evaluated with the Definitions' resources, reads the lake SYNPREF_LAKE_ROOT names."""
    import pyarrow as pa

    from jobs.definitions import build_defs
    from pipelines.lake import Lake
    from pipelines.review.ledger import VERDICTS

    root = tmp_path / "deployed-lake"
    _env(monkeypatch, SYNPREF_LAKE_ROOT=str(root))
    monkeypatch.setenv("SYNPREF_HOME", str(tmp_path / "elsewhere"))
    Lake(str(root)).append(VERDICTS, pa.table({"pair_id": ["p"]}))
    defs = build_defs()
    sensor = defs.get_sensor_def("new_verdicts_sensor")
    with dg.build_sensor_context(resources={"lake_store": defs.resources["lake_store"]}) as ctx:  # what it asks for
        result = sensor(ctx)
    assert [r.run_key for r in result.run_requests] == ["verdicts:0"]


def _tiny_lake(root: Path):
    from pipelines.ingest.run import ingest_shard
    from pipelines.lake import Lake
    from pipelines.synth.generator import write_shard

    lake = Lake(str(root))
    f = root.parent / "landing" / "shard-0.jsonl"
    write_shard(f, 60, seed=5, label_noise=0.2)
    ingest_shard(lake, str(f), source="synth", shard="synth/shard-0.jsonl", run_id="ingest")
    return lake


def test_the_api_key_reaches_the_endpoint_but_never_run_config_or_logs(monkeypatch, tmp_path):
    from assets.annotate import llm_annotations
    from jobs.definitions import build_defs
    from pipelines.tables import ANNOTATIONS

    lake = _tiny_lake(tmp_path / "lake")
    srv = FaultyJudge().start()
    try:
        _env(monkeypatch, SYNPREF_LLM_BACKEND="openai", SYNPREF_LLM_BASE_URL=srv.url, SYNPREF_LLM_MODELS="judge-x",
             SYNPREF_LLM_API_KEY=SECRET, SYNPREF_LAKE_ROOT=lake.root)
        defs = build_defs()
        with dg.instance_for_test() as inst:
            res = dg.materialize([llm_annotations], instance=inst, resources=defs.resources)
            assert res.success
            run = inst.get_run_by_id(res.run_id)
            logged = "\n".join(str(e) for e in inst.all_logs(res.run_id))
            config = str(run.run_config) + str(run)
    finally:
        srv.stop()
    assert srv.auth == {f"Bearer {SECRET}"}  # the key was used ...
    assert SECRET not in config and SECRET not in logged  # ... and is nowhere in the run's record
    assert "judge-x" in logged  # the log is real (the model id is in the materialization metadata)
    ann = lake.read(ANNOTATIONS)
    assert ann.height > 0 and set(ann["label_origin"]) == {"llm"}


def test_a_deployment_without_an_llm_refuses_llm_steps_and_never_simulates(monkeypatch, tmp_path):
    from assets.annotate import llm_annotations
    from jobs.definitions import build_defs
    from pipelines.tables import ANNOTATIONS

    lake = _tiny_lake(tmp_path / "lake")
    _env(monkeypatch, SYNPREF_LAKE_ROOT=lake.root)  # a lake, but no SYNPREF_LLM_*
    defs = build_defs()
    with dg.instance_for_test() as inst:
        res = dg.materialize([llm_annotations], instance=inst, resources=defs.resources, raise_on_error=False)
    assert not res.success
    text = "\n".join(str(e.event_specific_data) for e in res.all_events  # the llm resource refuses at its init
                     if e.event_type_value in ("RESOURCE_INIT_FAILURE", "STEP_FAILURE"))
    assert "no LLM is configured" in text and "SYNPREF_LLM_BACKEND" in text
    assert not lake.exists(ANNOTATIONS)  # nothing was judged, by the simulator or anything else
    # choosing the simulator is explicit, as `synpref demo` does through run config
    with dg.instance_for_test() as inst:
        res = dg.materialize([llm_annotations], instance=inst, resources=defs.resources,
                             run_config={"resources": {"llm": {"config": {"backend": "simulated"}}}})
    assert res.success and set(lake.read(ANNOTATIONS)["label_origin"]) == {"simulated"}

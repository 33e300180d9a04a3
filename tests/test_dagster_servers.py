"""The way users run it: a real Dagster webserver and daemon on 127.0.0.1, a run launched through the webserver's
GraphQL API (what the UI's Launch button sends), queued, picked up by the daemon, and its result read back from
the lake."""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import polars as pl
import pytest

from tests.servers import free_port, stop, wait_http

ROOT = Path(__file__).resolve().parents[1]

LAUNCH = """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
  ... on RunConfigValidationInvalid { errors { message } } ... on InvalidSubsetError { message } } }"""
STATUS = """query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status } } }"""
JOBS = """{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name }
  jobs { name } } } } }"""



def _gql(port: int, query: str, variables: dict | None = None) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", method="POST",
                                 data=json.dumps({"query": query, "variables": variables or {}}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        out = json.loads(r.read())
    assert "errors" not in out, out["errors"]
    return out["data"]


@pytest.mark.slow
def test_run_launched_through_the_webserver_is_executed_by_the_daemon(tmp_path):
    home, dh = tmp_path / "h", tmp_path / "h" / "dagster"
    dh.mkdir(parents=True)
    shutil.copy(ROOT / "dagster.yaml", dh / "dagster.yaml")
    env = {**os.environ, "SYNPREF_HOME": str(home), "DAGSTER_HOME": str(dh), "PYTHONUNBUFFERED": "1"}
    bindir = Path(sys.executable).parent
    cfg = '{"ops": {"synthetic_landing": {"config": {"n_pairs": 100, "n_shards": 1, "benchmark_pairs": 20}}}}'
    r = subprocess.run([str(bindir / "dagster"), "asset", "materialize", "-m", "definitions", "--select",
                        "synthetic_landing,benchmarks", "--config-json", cfg], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    port = free_port()
    logs = {n: open(tmp_path / f"{n}.log", "w") for n in ("webserver", "daemon")}
    procs = [subprocess.Popen([str(bindir / "dagster-webserver"), "-m", "definitions", "-h", "127.0.0.1",
                               "-p", str(port)], cwd=ROOT, env=env, stdout=logs["webserver"], stderr=subprocess.STDOUT),
             subprocess.Popen([str(bindir / "dagster-daemon"), "run", "-m", "definitions"], cwd=ROOT, env=env,
                              stdout=logs["daemon"], stderr=subprocess.STDOUT)]
    try:
        wait_http(f"http://127.0.0.1:{port}/server_info", procs, tmp_path / "webserver.log")
        repos = _gql(port, JOBS)["repositoriesOrError"]["nodes"]
        assert len(repos) == 1 and {"main_job", "ingest_job", "family_job"} <= {j["name"] for j in repos[0]["jobs"]}
        params = {"selector": {"repositoryLocationName": repos[0]["location"]["name"],
                               "repositoryName": repos[0]["name"], "jobName": "ingest_job"},
                  "runConfigData": {},
                  "executionMetadata": {"tags": [{"key": "dagster/partition", "value": "synth/shard-000.jsonl"}]}}
        launched = _gql(port, LAUNCH, {"p": params})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]
        status, deadline = "QUEUED", time.time() + 240
        while status not in ("SUCCESS", "FAILURE", "CANCELED"):
            assert time.time() < deadline, (status, (tmp_path / "daemon.log").read_text()[-3000:])
            time.sleep(2)
            status = _gql(port, STATUS, {"id": run_id})["runOrError"]["status"]
        assert status == "SUCCESS", (tmp_path / "daemon.log").read_text()[-3000:]
    finally:
        stop(procs)
    df = pl.read_delta(str(home / "lake" / "raw_pairs"))
    assert df.height > 50 and set(df["shard"]) == {"synth/shard-000.jsonl"}

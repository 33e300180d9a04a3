import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
HH = SHARED / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


@pytest.fixture
def lake(tmp_path):
    from pipelines.lake import Lake

    return Lake(str(tmp_path / "lake"))


@pytest.fixture
def hh_path():
    if not HH.exists():
        pytest.skip(f"real data absent: {HH} (../shared is not part of the product)")
    return str(HH)


@pytest.fixture
def synpref_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("SYNPREF_HOME", str(home))
    monkeypatch.delenv("SYNPREF_LAKE_ROOT", raising=False)
    monkeypatch.delenv("SYNPREF_LANDING_ROOT", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home}/mlflow.db")
    return home


@pytest.fixture
def serve_review():
    """Start the review app for a lake + annotators file (and any create_app option: a test clock, a short lease)
    under uvicorn on 127.0.0.1; returns its base URL."""
    import threading
    import time

    import uvicorn

    from pipelines.review.app import create_app
    from tests.servers import free_port

    servers = []

    def start(lake_root: str, annotators, **kwargs) -> str:
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(lake_root, annotators, **kwargs), host="127.0.0.1",
                                               port=port, log_level="warning"))
        th = threading.Thread(target=server.run, daemon=True)
        th.start()
        deadline = time.monotonic() + 60
        while not server.started:  # uvicorn offers no startup event; bounded, and fails with a reason
            assert th.is_alive() and time.monotonic() < deadline, "review app did not start within 60 s"
            time.sleep(0.05)
        servers.append((server, th))
        return f"http://127.0.0.1:{port}"

    yield start
    for server, th in servers:
        server.should_exit = True
        th.join(10)


@pytest.fixture
def s3(monkeypatch):
    """A real S3 endpoint on 127.0.0.1 (moto's threaded server), with the AWS_* variables pointing at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    from tests.servers import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ALLOW_HTTP": "true"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(Bucket="lake")
    yield env
    server.stop()

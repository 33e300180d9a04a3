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
